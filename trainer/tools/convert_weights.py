"""Convert another framework's Mask R-CNN weights into a folder this project reads.

    python -m trainer.tools.convert_weights SRC OUT --format torchvision|detectron2|mmdet
        [--recipe R] [--classes a,b,...] [key=value ...]

SRC: a weights file (torchvision ``.pth``, detectron2 model-zoo ``.pkl`` or ``.pth``,
mmdetection ``.pth``) or an http(s) URL. OUT gets what ``Detector.save_pretrained`` writes
(``model.safetensors``, ``config.yaml``, ``classes.json``, ``README.md``): use it as
``load_from=OUT`` in a recipe, ``--checkpoint OUT`` for predict and evaluate, or
``Detector.from_pretrained(OUT)``. The recipe describing the model defaults to the
format's own in ``recipes/`` (mask_rcnn_torchvision.yaml, mask_rcnn_detectron2.yaml,
mask_rcnn_mmdet.yaml); the class names come from the weights (COCO's for the model zoos'
COCO models) unless ``--classes`` gives them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.cli import run_main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPES = {
    "torchvision": "mask_rcnn_torchvision.yaml",
    "detectron2": "mask_rcnn_detectron2.yaml",
    "mmdet": "mask_rcnn_mmdet.yaml",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.tools.convert_weights",
        description="Convert torchvision / detectron2 / mmdetection Mask R-CNN weights.",
    )
    parser.add_argument("src", help="weights file or http(s) URL")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--format", required=True, choices=sorted(DEFAULT_RECIPES))
    parser.add_argument("--recipe", help="recipe of the model (default: the format's own)")
    parser.add_argument("--classes", help="comma-separated class names of labels 1..K")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from trainer.detector import Detector
    from trainer.weights.pretrained import build_pretrained, pretrained_classes, pretrained_recipe
    from trainer.weights.read import read_weights

    weights = read_weights(args.src, format=args.format)
    recipe = args.recipe or RECIPES / DEFAULT_RECIPES[args.format]
    cfg = pretrained_recipe(weights, recipe, args.overrides)
    names = [name.strip() for name in args.classes.split(",")] if args.classes else None
    classes = pretrained_classes(weights, cfg, names)
    model = build_pretrained(weights, cfg, classes, compile_inference=False)
    folder = Detector(model, cfg, classes, device="cpu").save_pretrained(args.out)
    print(
        f"{weights.format} weights {weights.path} -> {folder} ({len(classes.names)} classes, "
        f"recipe {recipe}; {len(weights.unused)} source tensors without a counterpart)"
    )
    return folder


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
