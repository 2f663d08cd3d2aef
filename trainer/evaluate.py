"""Evaluate a checkpoint on the recipe's val set with COCO metrics.

    python -m trainer.evaluate RECIPE --checkpoint PATH [--out DIR] [key=value ...]
    accelerate launch -m trainer.evaluate RECIPE --checkpoint PATH      (several processes)

PATH may be a work_dir (its latest checkpoint), a checkpoint folder or a weights file.
Writes DIR/metrics.json and DIR/predictions.json (COCO results format); DIR defaults to
``<work_dir>/eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="COCO bbox and segm AP of a checkpoint on the recipe's val set.",
    )
    parser.add_argument("recipe", help="the recipe the checkpoint was trained with")
    parser.add_argument(
        "--checkpoint", required=True, help="work_dir, checkpoint folder or weights file"
    )
    parser.add_argument("--out", help="output folder (default: <work_dir>/eval)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from accelerate import Accelerator

    from trainer.config import load_recipe
    from trainer.data import build_dataloader, build_dataset
    from trainer.engine.checkpoint import load_weights
    from trainer.engine.logging import setup_logger
    from trainer.evaluation.coco import CocoEvaluator, summary_table
    from trainer.evaluation.inference import evaluate_on_loader
    from trainer.models import build_detector

    cfg = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.work_dir) / "eval"
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    logger = setup_logger(out, accelerator.is_main_process)

    with accelerator.main_process_first():
        dataset = build_dataset(cfg.data.val, train=False)
    model = build_detector(cfg.model, num_classes=len(dataset.CLASSES))
    weights = load_weights(model, args.checkpoint)
    logger.info("weights %s, val set %s (%d images)", weights, cfg.data.val.ann_file, len(dataset))

    loader = build_dataloader(dataset, cfg.data.imgs_per_gpu, cfg.data.workers_per_gpu, False)
    model, loader = accelerator.prepare(model, loader)
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat, accelerator=accelerator)
    metrics = evaluate_on_loader(model, loader, evaluator, accelerator, desc="evaluate")

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "predictions.json").write_text(json.dumps(evaluator.results()))
        logger.info("\n%s", summary_table(metrics))
        logger.info("wrote %s and %s", out / "metrics.json", out / "predictions.json")
    return metrics


def cli() -> None:
    from trainer.config import RecipeError

    try:
        main()
    except (RecipeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
