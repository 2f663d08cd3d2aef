"""Train a detector from a recipe.

accelerate launch trainer/run.py RECIPE [key=value ...]
python trainer/run.py RECIPE [key=value ...]        (one process, same as python -m trainer.run)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `python trainer/run.py` puts trainer/ itself first on sys.path, where its sub-packages
    # (data, models, ...) would shadow other top-level modules: use the repository root.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from trainer.cli import run_main  # noqa: E402  (after the sys.path fix above)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trainer/run.py",
        description="Train Mask R-CNN from a YAML recipe.",
        epilog="Example: accelerate launch trainer/run.py recipes/demo.yaml total_epochs=2",
    )
    parser.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/mask_rcnn.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optimizer.lr=0.01"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    # Imported after argument parsing so `--help` answers at once.
    from trainer.config import load_recipe
    from trainer.engine import build_accelerator
    from trainer.engine.work_dir_lock import hold_work_dir

    cfg = load_recipe(args.recipe, args.overrides)
    accelerator = build_accelerator(cfg)
    # Before anything is written: a second run on the same work_dir stops here.
    with hold_work_dir(accelerator, cfg.work_dir):
        return train(cfg, args.recipe, accelerator)


def train(cfg, recipe: str, accelerator) -> dict[str, float]:
    """Build the datasets and the detector of ``cfg`` and train it, in the held work_dir."""
    from trainer.config import save_recipe
    from trainer.data import build_dataset
    from trainer.engine import train_detector
    from trainer.engine.logging import setup_logger
    from trainer.engine.work_dir_lock import log_lock_notices
    from trainer.models import build_detector
    from trainer.models.backbone import describe
    from trainer.seeding import seed_everything

    logger = setup_logger(cfg.work_dir, accelerator.is_main_process)
    log_lock_notices(cfg.work_dir)
    if accelerator.is_main_process:
        save_recipe(cfg, Path(cfg.work_dir) / "config.yaml")
    logger.info(
        "recipe %s -> work_dir %s (%d processes, %s)",
        recipe,
        cfg.work_dir,
        accelerator.num_processes,
        accelerator.distributed_type.value,
    )
    seed_everything(cfg.seed)

    # The main process goes first so a dataset generated on first use is written once.
    with accelerator.main_process_first():
        datasets = {"train": build_dataset(cfg.data.train, train=True)}
        if cfg.val_interval_iters or any(phase == "val" for phase, _ in cfg.workflow):
            datasets["val"] = build_dataset(cfg.data.val, train=False)
    logger.info(
        "train set: %d images, %d classes %s",
        len(datasets["train"]),
        len(datasets["train"].CLASSES),
        list(datasets["train"].CLASSES),
    )
    model = build_detector(cfg.model, num_classes=len(datasets["train"].CLASSES))
    model.CLASSES = datasets["train"].CLASSES
    logger.info("backbone %s: %s", cfg.model.backbone.name, describe(model.backbone))
    return train_detector(model, datasets, cfg, accelerator)


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
