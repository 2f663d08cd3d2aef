"""Parameters and FLOPs of the detector a recipe builds, per module.

    python -m trainer.tools.analyze_model RECIPE [--size H [W]] [--depth D]
        [--num-classes K] [key=value ...]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one inference pass on
an H x W image (default: the val set's shortest-edge size by its longest-edge limit, e.g.
800 x 1333). As there, a multiply-add counts as two FLOPs and only convolutions and matrix
products are counted (not RoIAlign, NMS or elementwise ops). The RoI heads' share depends on
how many proposals and detections the weights produce; the weights are random here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from trainer.cli import run_main


@dataclass
class ModuleStats:
    """One row of the table: ``name`` is the dotted module path ("" for the whole model)."""

    name: str
    params: int
    trainable: int
    flops: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.tools.analyze_model",
        description="Parameters, trainable parameters and FLOPs of the detector, per module.",
    )
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        metavar="PX",
        help="input height and width, or one value for a square (default: from data.val)",
    )
    parser.add_argument(
        "--depth", type=int, default=2, help="module nesting depth shown (default: 2)"
    )
    parser.add_argument(
        "--num-classes", type=int, help="default: model.num_classes, else the annotation file's"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)
    if args.size is not None and (len(args.size) > 2 or min(args.size) < 1):
        parser.error("--size takes one or two positive integers: H [W]")
    return args


@torch.no_grad()
def analyze(model: torch.nn.Module, height: int, width: int) -> tuple[list[ModuleStats], int]:
    """Per-module parameter counts and inference FLOPs on one random ``height`` x ``width``
    image, in ``named_modules`` order (the model itself first, named ""); also returns the
    number of detections of that pass."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=generator)
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = model([image])
    # FlopCounterMode names a module "<root class>.<path>"; the whole pass is "Global".
    root = type(model).__name__
    per_module = {
        name.removeprefix(root).removeprefix("."): sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name != "Global"
    }
    modules = dict(model.named_modules())
    # A submodule whose work runs outside its own forward (e.g. a layer whose weight a head
    # uses directly) is not seen by the counter, but its parent is; and a parent whose
    # children ran gets at least their sum.
    # Children come after their parent in named_modules, so walking backwards sees them first.
    flops: dict[str, int] = {}
    for name, module in reversed(modules.items()):
        prefix = f"{name}." if name else ""
        children = sum(flops[prefix + child] for child, _ in module.named_children())
        flops[name] = max(per_module.get(name, 0), children)
    flops[""] = counter.get_total_flops()
    stats = [
        ModuleStats(
            name=name,
            params=sum(p.numel() for p in module.parameters()),
            trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
            flops=flops[name],
        )
        for name, module in modules.items()
    ]
    return stats, len(outputs[0]["scores"])


def format_table(stats: list[ModuleStats], depth: int) -> str:
    """Aligned table of the rows nested at most ``depth`` deep, indented by nesting; a last
    row holds the FLOPs of the model's own code outside its submodules (e.g. mask pasting)."""
    total = max(stats[0].flops, 1)
    rows = [(("model" if s.name == "" else s.name), s) for s in stats if s.name.count(".") < depth]
    labels = ["model"] + ["  " * (n.count(".") + 1) + n.split(".")[-1] for n, _ in rows[1:]]
    top = sum(s.flops for s in stats if s.name and "." not in s.name)
    own = ModuleStats("", 0, 0, stats[0].flops - top)
    rows.append(("", own))
    labels.append("  (outside submodules)")
    width = max(len("module"), *(len(label) for label in labels))
    lines = [f"{'module':<{width}} {'params':>10} {'trainable':>10} {'GFLOPs':>9} {'FLOPs %':>8}"]
    for label, (_, s) in zip(labels, rows, strict=True):
        lines.append(
            f"{label:<{width}} {s.params / 1e6:>9.2f}M {s.trainable / 1e6:>9.2f}M "
            f"{s.flops / 1e9:>9.3f} {100 * s.flops / total:>7.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[ModuleStats]:
    """Run the command; returns the per-module rows (all depths)."""
    args = parse_args(argv)
    from trainer.config import RecipeError, load_recipe
    from trainer.models import build_detector
    from trainer.weights.pretrained import classes_from_annotations

    cfg = load_recipe(args.recipe, args.overrides)
    num_classes = args.num_classes or cfg.model.num_classes
    if num_classes is None:
        classes = classes_from_annotations(cfg)
        if classes is None:
            raise RecipeError(
                f"the class count comes from the recipe's annotation files, but neither "
                f"data.val.ann_file '{cfg.data.val.ann_file}' nor data.train.ann_file "
                f"'{cfg.data.train.ann_file}' exists: give it with --num-classes K."
            )
        num_classes = len(classes.names)
    if args.size is None:
        height, width = min(cfg.data.val.min_size), cfg.data.val.max_size
    else:
        height, width = args.size[0], args.size[-1]

    model = build_detector(cfg.model, num_classes=num_classes)
    stats, detections = analyze(model, height, width)
    print(f"{cfg.model.backbone.name} Mask R-CNN, {num_classes} classes, input {height}x{width}")
    print(format_table(stats, args.depth))
    print(
        f"total: {stats[0].params / 1e6:.2f}M parameters ({stats[0].trainable / 1e6:.2f}M "
        f"trainable), {stats[0].flops / 1e9:.2f} GFLOPs ({detections} detections)"
    )
    return stats


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
