"""Render a split's ground truth, as the model sees it, to PNG files.

    python -m trainer.tools.browse_dataset RECIPE [--split train|val] [--num N] [--out DIR]
        [--seed S] [--no-labels] [key=value ...]

Images pass through the split's transforms (for ``train``: multi-scale resize and random
flips, drawn with ``--seed``), then their masks, boxes and class names are drawn. Writes
``DIR/<image id>_<file stem>.png`` for the first N images; DIR defaults to
``<work_dir>/browse_<split>``.

Class names are written only for sets of more than one class, sized to their object, and
left out where they would hide it (see :func:`trainer.visualize.draw_instances`);
``--no-labels`` leaves them all out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.cli import run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.tools.browse_dataset",
        description="Draw a split's ground truth after its transforms to PNG files.",
    )
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--num", type=int, default=20, help="how many images (default: 20)")
    parser.add_argument("--out", help="output folder (default: <work_dir>/browse_<split>)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random transforms (the recipe's seed shows its first training epoch)",
    )
    parser.add_argument(
        "--no-labels",
        action="store_true",
        help="draw masks and boxes only, no class names",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")
    return args


def _name(dataset, image_id: int) -> str:
    """``<image id>_<file stem>`` for COCO-format sets, the image id alone otherwise."""
    coco = getattr(dataset, "coco", None)
    if coco is None:
        return str(image_id)
    return f"{image_id}_{Path(coco.imgs[image_id]['file_name']).stem}"


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the command; returns the written PNG paths."""
    args = parse_args(argv)
    from torchvision.io import write_png
    from tqdm.auto import tqdm

    from trainer.config import load_recipe
    from trainer.data import build_dataset
    from trainer.seeding import SeededSamples
    from trainer.visualize import draw_instances

    cfg = load_recipe(args.recipe, args.overrides)
    # Each sample's transforms drawn as training draws them in epoch 1 with this seed.
    dataset = SeededSamples(
        build_dataset(cfg.data[args.split], train=args.split == "train"), args.seed
    )
    out = Path(args.out) if args.out else Path(cfg.work_dir) / f"browse_{args.split}"
    out.mkdir(parents=True, exist_ok=True)

    written = []
    for index in tqdm(range(min(args.num, len(dataset))), desc=f"browse {args.split}"):
        image, target = dataset[index]
        overlay = draw_instances(
            image,
            target["boxes"],
            target["labels"],
            None,
            target["masks"].bool(),
            dataset.CLASSES,
            show_names=False if args.no_labels else None,
        )
        path = out / f"{_name(dataset, target['image_id'])}.png"
        write_png(overlay, str(path))
        written.append(path)
    print(f"wrote {len(written)} images of the {args.split} split to {out}/")
    return written


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
