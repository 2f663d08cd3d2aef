"""Detect instances in image files and draw them.

    python -m trainer.predict RECIPE --checkpoint PATH --images FILE_OR_DIR --out DIR
        [--score-threshold 0.5] [--batch-size N] [key=value ...]
    accelerate launch -m trainer.predict ...        (several processes share the images)

PATH may be a work_dir (its latest checkpoint), a checkpoint folder or a weights file. Images
(.jpg, .jpeg, .png, .webp; a folder is searched recursively) are resized with the recipe's val
transform and the detections returned at their original size. Class names and category ids
come from the categories of ``data.val.ann_file`` (else ``data.train.ann_file``), in the
label order training used.

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
    parser.add_argument("recipe", help="the recipe the checkpoint was trained with")
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
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


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


def read_categories(cfg) -> list[dict]:
    """Categories of the recipe's annotation file (val, else train), sorted by id: the order
    that gives the model's labels 1..K."""
    return read_classes(cfg)[0]


def read_classes(cfg) -> tuple[list[dict], bool]:
    """(categories ``{"id", "name"}`` sorted by id, whether the annotations have masks) from
    the recipe's annotation file (val, else train). A boxes-only file means a model whose
    mask head never trained: its masks are left out."""
    from trainer.config import RecipeError
    from trainer.data.coco import read_coco_json

    for split in ("val", "train"):
        ann_file = Path(cfg.data[split].ann_file)
        if ann_file.is_file():
            table, segmentations = read_coco_json(ann_file)
            if not table.categories:
                raise RecipeError(f"{ann_file} has no categories to name the classes with.")
            has_masks = len(table.ann_ids) == 0 or bool(segmentations.present.any())
            categories = [{"id": id, "name": name} for id, name in table.categories.items()]
            return categories, has_masks
    raise RecipeError(
        "class names come from the categories of the recipe's annotation files, but neither "
        f"data.val.ann_file '{cfg.data.val.ann_file}' nor data.train.ann_file "
        f"'{cfg.data.train.ann_file}' exists: point one at the file the model was trained "
        "with, e.g. data.val.ann_file=PATH."
    )


def overlay_path(out: Path, file_name: str) -> Path:
    """``out/overlays/<file_name>.png``; a .png keeps its name. The original extension stays
    in the name, so that ``a.jpg`` and ``a.png`` do not overwrite each other's overlay."""
    name = file_name if file_name.lower().endswith(".png") else f"{file_name}.png"
    return out / "overlays" / name


class ImageFiles:
    """Dataset of image files. Item: (uint8 [3, h, w] resized by ``transform``, the recipe's
    val transform; {"orig_size": (H, W), "original": uint8 [3, H, W], "file": Path})."""

    def __init__(self, files: list[Path], transform):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import torch
        from torchvision import tv_tensors
        from torchvision.io import ImageReadMode, decode_image

        # EXIF orientation applied: results line up with the image as viewers show it.
        image = decode_image(
            str(self.files[index]), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )
        height, width = image.shape[-2:]
        # The detection transforms expect a target; an empty one keeps them unchanged.
        empty = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8)),
        }
        resized, _ = self.transform(tv_tensors.Image(image), empty)
        target = {"orig_size": (height, width), "original": image, "file": self.files[index]}
        return resized.as_subclass(torch.Tensor), target


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the command; returns the predictions written to predictions.json."""
    args = parse_args(argv)
    from accelerate.utils import gather_object
    from torch.utils.data import DataLoader
    from torchvision.io import write_png

    from trainer.config import load_recipe
    from trainer.data.loader import collate
    from trainer.data.transforms import build_transforms
    from trainer.engine.accelerator import build_inference_accelerator
    from trainer.engine.checkpoint import load_weights
    from trainer.evaluation.inference import inference_batches
    from trainer.evaluation.results import category_lookup, to_coco_results
    from trainer.models import build_detector
    from trainer.visualize import draw_instances

    cfg = load_recipe(args.recipe, args.overrides)
    root, files = find_images(args.images)
    categories, with_masks = read_classes(cfg)
    class_names = [category["name"] for category in categories]
    cat_lookup = category_lookup({i + 1: c["id"] for i, c in enumerate(categories)})
    cat_names = {category["id"]: category["name"] for category in categories}

    accelerator = build_inference_accelerator(cfg)
    model = build_detector(cfg.model, num_classes=len(categories))
    load_weights(model, args.checkpoint)
    # Device placement only: inference needs no DistributedDataParallel wrapper.
    model = accelerator.prepare_model(model, evaluation_mode=True)

    out = Path(args.out)
    transform = build_transforms(list(cfg.data.val.min_size), cfg.data.val.max_size, 0.0)
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
