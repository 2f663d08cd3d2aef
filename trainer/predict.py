"""Detect instances in image files and draw them.

    python -m trainer.predict [RECIPE] --checkpoint PATH --images FILE_OR_DIR --out DIR
        [--score-threshold 0.5] [--batch-size N] [--workers N] [key=value ...]
    accelerate launch -m trainer.predict ...        (several processes share the images)

PATH may be a work_dir (its latest checkpoint), a checkpoint folder or a weights file, or
an ONNX export (``model.onnx`` or its folder, from ``python -m trainer.export``), run with
onnxruntime. The recipe and the class names come with the checkpoint (``config.yaml``,
``classes.json``); RECIPE is needed only for weights without them (older checkpoints, or
another framework's weights: then the classes come from the categories of
``data.val.ann_file``, else ``data.train.ann_file``). Images (.jpg, .jpeg, .png, .webp; a
folder is searched recursively) are resized with the recipe's val transform and the
detections returned at their original size.

Images are read and resized in ``--workers`` DataLoader processes and run in batches of up
to ``--batch-size`` images that pad to the same size, so that each image gets the input it
would get alone: the predictions do not depend on the batch size (beyond float rounding).
Results and overlays are made by threads while the model runs on.

Writes, for detections scoring at least ``--score-threshold``:

- ``DIR/predictions.json``: the COCO results format, with ``file_name`` (the image's path
  relative to FILE_OR_DIR's folder) in place of ``image_id`` and the class name added:
  ``[{"file_name", "category_id", "category_name", "bbox": [x, y, w, h], "score",
  "segmentation": {"size": [H, W], "counts": str}}, ...]``.
- ``DIR/overlays/<file_name>.png`` (``<file_name>`` itself for a .png): the image with masks,
  boxes, class names and scores. The extension is kept, so ``a.jpg`` and ``a.png`` get two.

When the annotation file has no segmentations (a boxes-only model), masks are left out of
both.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from trainer.cli import run_main

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Detect instances in images: predictions.json and one overlay PNG each.",
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        help="the recipe the checkpoint was trained with (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="work_dir, checkpoint folder or weights file"
    )
    parser.add_argument("--images", required=True, help="an image file or a folder of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="keep detections scoring at least this (default: 0.5)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per forward pass (default: data.imgs_per_gpu)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="DataLoader processes reading the images (default: data.workers_per_gpu)",
    )
    parser.add_argument(
        "--no-labels", action="store_true", help="overlays without class names or scores"
    )
    parser.add_argument("--no-scores", action="store_true", help="overlays without scores")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)
    split_recipe_argument(args)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be at least 0")
    return args


def split_recipe_argument(args: argparse.Namespace) -> None:
    """Without a RECIPE, argparse takes the first ``key=value`` for it: give it back."""
    if args.recipe is not None and "=" in args.recipe and not Path(args.recipe).exists():
        args.overrides.insert(0, args.recipe)
        args.recipe = None


def find_images(path: str | Path) -> tuple[Path, list[Path]]:
    """An image file or a folder (searched recursively) -> (root, sorted image paths); file
    names in the outputs are relative to root."""
    path = Path(path)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--images '{path}' is neither an image file nor a folder.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{path}' or its subfolders."
        )
    return path, files


def overlay_path(out: Path, file_name: str) -> Path:
    """``out/overlays/<file_name>.png``; a .png keeps its name. The original extension stays
    in the name, so that ``a.jpg`` and ``a.png`` do not overwrite each other's overlay."""
    name = file_name if file_name.lower().endswith(".png") else f"{file_name}.png"
    return out / "overlays" / name


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the command; returns the predictions written to predictions.json."""
    args = parse_args(argv)
    from accelerate.utils import gather_object

    from trainer.data.inference_images import inference_transform
    from trainer.engine.accelerator import build_inference_accelerator
    from trainer.export import load_onnx, onnx_export

    root, files = find_images(args.images)
    onnx_path = onnx_export(args.checkpoint)
    if onnx_path is not None:
        model, cfg, classes = load_onnx(onnx_path, args.recipe, args.overrides)
        accelerator = build_inference_accelerator(cfg)
        divisor = None  # the graph takes one image at a time: any sizes batch together
    else:
        from trainer.weights.pretrained import (
            build_pretrained,
            pretrained_classes,
            pretrained_recipe,
        )
        from trainer.weights.read import read_weights

        weights = read_weights(args.checkpoint)
        cfg = pretrained_recipe(weights, args.recipe, args.overrides)
        classes = pretrained_classes(weights, cfg)
        accelerator = build_inference_accelerator(cfg)
        model = build_pretrained(weights, cfg, classes)
        divisor = padding_divisor(model)
        # Device placement only: inference needs no DistributedDataParallel wrapper.
        model = accelerator.prepare_model(model, evaluation_mode=True)

    out = Path(args.out)
    transform = inference_transform(cfg.data.val.min_size, cfg.data.val.max_size)
    batch_size = args.batch_size or cfg.data.imgs_per_gpu
    workers = cfg.data.workers_per_gpu if args.workers is None else args.workers
    writer = ImageOutputs(root, out, classes, args)
    with accelerator.split_between_processes(files) as own_files:
        results = predict_files(
            model, own_files, transform, batch_size, workers, divisor, writer, accelerator
        )

    if accelerator.num_processes > 1:
        results = gather_object(results)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(results))
        print(
            f"{len(results)} detections in {len(files)} images (score >= "
            f"{args.score_threshold}): wrote {out / 'predictions.json'} and {out / 'overlays'}/"
        )
    return results


def padding_divisor(model) -> int | None:
    """What the model pads a batch's height and width to a multiple of; None for a backbone
    that takes one input size (every image is padded to it)."""
    if model.backbone.fixed_size is not None:
        return None
    return model.size_divisibility


class ImageOutputs:
    """One image's share of the outputs: its COCO results (returned) and its overlay
    (written). Runs in the writer threads."""

    def __init__(self, root: Path, out: Path, classes, args: argparse.Namespace):
        from trainer.evaluation.results import category_lookup

        self.root, self.out, self.args = root, out, args
        self.with_masks = classes.has_masks
        self.class_names = classes.names
        self.cat_lookup = category_lookup(classes.label_to_cat)
        self.cat_names = {
            cat: classes.names[label - 1] for label, cat in classes.label_to_cat.items()
        }

    def __call__(self, target: dict, kept: dict) -> list[dict]:
        from trainer.evaluation.results import to_coco_results

        file_name = target["file"].relative_to(self.root).as_posix()
        results = []
        for result in to_coco_results(kept, self.cat_lookup, self.with_masks):
            name = self.cat_names[result["category_id"]]
            results.append({"file_name": file_name, **result, "category_name": name})
        self.write_overlay(overlay_path(self.out, file_name), target["original"], kept)
        return results

    def write_overlay(self, path: Path, original, kept: dict) -> None:
        from torchvision.io import write_png

        from trainer.visualize import draw_instances

        args = self.args
        overlay = draw_instances(
            original,
            kept["boxes"],
            kept["labels"],
            kept["scores"],
            kept["masks"] if self.with_masks else None,
            self.class_names,
            args.score_threshold,
            show_names=False if args.no_labels else None,
            show_scores=not (args.no_labels or args.no_scores),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(overlay, str(path))


def same_size_batches(items, batch_size: int, divisor: int | None, window: int):
    """Group ``(index, image, target)`` items, in file order, into batches of up to
    ``batch_size`` images that pad to the same size, so that each image gets exactly the
    input it would get alone (``divisor``: the model's padding multiple; None: any sizes
    batch together). Batches form among the next ``window`` images: a group still short
    then goes as it is, the one holding the oldest image first."""
    groups: dict[tuple[int, int], list] = {}
    held = 0
    for item in items:
        height, width = item[1].shape[-2:]
        key = (0, 0) if divisor is None else (-(-height // divisor), -(-width // divisor))
        group = groups.setdefault(key, [])
        group.append(item)
        held += 1
        if len(group) == batch_size:
            held -= len(groups.pop(key))
            yield group
        elif held >= window:
            oldest = min(groups, key=lambda k: groups[k][0][0])
            batch = groups.pop(oldest)
            held -= len(batch)
            yield batch
    yield from sorted(groups.values(), key=lambda group: group[0][0])


def predict_files(
    model, files, transform, batch_size, workers, divisor, writer, accelerator
) -> list[dict]:
    """Detections of ``files``, in their order. Images are read and resized in ``workers``
    DataLoader processes, run in batches of images that pad to one size, and each image's
    results and overlay are made in writer threads while the model runs on."""
    import contextlib
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from trainer.data.inference_images import ImageFiles

    # One image per item: batches are formed here, by size.
    loader = DataLoader(ImageFiles(files, transform), batch_size=None, num_workers=workers)
    is_torch = isinstance(model, torch.nn.Module)
    autocast = accelerator.autocast if is_torch else contextlib.nullcontext
    # Masks only for the detections kept (an export makes them for all).
    keeping_scores = getattr(model, "keeping_scores", lambda _: contextlib.nullcontext())
    threads = min(4, max(1, (os.cpu_count() or 1) // 2))
    per_image: list[list[dict]] = [[] for _ in files]
    pending: deque = deque()
    bar = tqdm(
        total=len(files),
        desc="predict",
        unit="img",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    with bar, ThreadPoolExecutor(threads, thread_name_prefix="predict-out") as pool:
        items = ((index, image, target) for index, (image, target) in enumerate(loader))
        for batch in same_size_batches(items, batch_size, divisor, window=4 * batch_size):
            indices, images, targets = zip(*batch)
            with torch.no_grad(), autocast(), keeping_scores(writer.args.score_threshold):
                outputs = model(list(images), output_sizes=[t["orig_size"] for t in targets])
            for index, target, output in zip(indices, targets, outputs, strict=True):
                keep = output["scores"] >= writer.args.score_threshold
                # Only what is kept leaves the device.
                kept = {key: value[keep].cpu() for key, value in output.items()}
                pending.append((index, pool.submit(writer, target, kept)))
            # Bounded: each waiting image holds its picture and its masks.
            while len(pending) > 2 * threads * batch_size:
                index, future = pending.popleft()
                per_image[index] = future.result()
            bar.update(len(batch))
        for index, future in pending:
            per_image[index] = future.result()
    return [result for results in per_image for result in results]


def cli() -> None:
    from trainer.onnx_model import MissingDependencyError

    run_main(main, errors=(MissingDependencyError,))


if __name__ == "__main__":
    cli()
