"""Detect instances in image files and draw them.

    python -m trainer.predict [RECIPE] --checkpoint PATH --images FILE_OR_DIR --out DIR
        [--score-threshold 0.5] [--batch-size N] [key=value ...]
    accelerate launch -m trainer.predict ...        (several processes share the images)

PATH may be a work_dir (its latest checkpoint), a checkpoint folder or a weights file. The
recipe and the class names come with the checkpoint (``config.yaml``, ``classes.json``);
RECIPE is needed only for weights without them (older checkpoints, or another framework's
weights: then the classes come from the categories of ``data.val.ann_file``, else
``data.train.ann_file``). Images (.jpg, .jpeg, .png, .webp; a folder is searched
recursively) are resized with the recipe's val transform and the detections returned at
their original size.

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
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)
    split_recipe_argument(args)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
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
    from torch.utils.data import DataLoader
    from torchvision.io import write_png

    from trainer.data.inference_images import ImageFiles, inference_transform
    from trainer.data.loader import collate
    from trainer.engine.accelerator import build_inference_accelerator
    from trainer.evaluation.inference import inference_batches
    from trainer.evaluation.results import category_lookup, to_coco_results
    from trainer.visualize import draw_instances
    from trainer.weights.pretrained import (
        build_pretrained,
        pretrained_classes,
        pretrained_recipe,
    )
    from trainer.weights.read import read_weights

    root, files = find_images(args.images)
    weights = read_weights(args.checkpoint)
    cfg = pretrained_recipe(weights, args.recipe, args.overrides)
    classes = pretrained_classes(weights, cfg)
    with_masks = classes.has_masks
    class_names = classes.names
    cat_lookup = category_lookup(classes.label_to_cat)
    cat_names = {cat: classes.names[label - 1] for label, cat in classes.label_to_cat.items()}

    accelerator = build_inference_accelerator(cfg)
    model = build_pretrained(weights, cfg, classes)
    # Device placement only: inference needs no DistributedDataParallel wrapper.
    model = accelerator.prepare_model(model, evaluation_mode=True)

    out = Path(args.out)
    transform = inference_transform(cfg.data.val.min_size, cfg.data.val.max_size)
    results: list[dict] = []
    with accelerator.split_between_processes(files) as own_files:
        loader = DataLoader(
            ImageFiles(own_files, transform),
            batch_size=args.batch_size or cfg.data.imgs_per_gpu,
            num_workers=cfg.data.workers_per_gpu,
            collate_fn=collate,
        )
        batches = inference_batches(model, loader, accelerator, desc="predict")
        for _, targets, outputs in batches:
            for target, output in zip(targets, outputs, strict=True):
                file_name = target["file"].relative_to(root).as_posix()
                keep = output["scores"] >= args.score_threshold
                # Only what is kept leaves the device.
                kept = {key: value[keep].cpu() for key, value in output.items()}
                for result in to_coco_results(kept, cat_lookup, with_masks):
                    name = cat_names[result["category_id"]]
                    results.append({"file_name": file_name, **result, "category_name": name})
                overlay = draw_instances(
                    target["original"],
                    kept["boxes"],
                    kept["labels"],
                    kept["scores"],
                    kept["masks"] if with_masks else None,
                    class_names,
                    args.score_threshold,
                )
                path = overlay_path(out, file_name)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(overlay, str(path))

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


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
