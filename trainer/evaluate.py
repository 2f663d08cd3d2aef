"""Evaluate a checkpoint on the recipe's val set with COCO metrics.

    python -m trainer.evaluate [RECIPE] --checkpoint PATH [--out DIR] [--per-class]
        [--backend {pycocotools,faster-coco-eval}] [key=value ...]
    accelerate launch -m trainer.evaluate RECIPE --checkpoint PATH      (several processes)

PATH may be a work_dir (its latest checkpoint), a checkpoint folder or a weights file. The
recipe comes with the checkpoint (its ``config.yaml``) unless RECIPE is given; point the val
set elsewhere with ``data.val.ann_file=... data.val.img_dir=...``.
Writes to DIR (default ``<work_dir>/eval``):

- ``metrics.json``: the metrics logged. ``--per-class`` also prints AP and AP50 per class and
  adds them as ``{bbox,segm}/{AP,AP50}/<class name>``.
- ``bbox_predictions.json``, ``segm_predictions.json`` (COCO results format): the results each
  task scored, boxes without masks and masks without boxes. Hand these to other tools: plain
  pycocotools (``COCOeval(gt, gt.loadRes(file), iou_type)``) scores them to metrics.json.
- ``predictions.json``: every result with both its box and its mask. Its segm size metrics
  (APs, APm, APl) rescore differently: ``loadRes`` takes the area of a result with a box from
  the box.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.cli import run_main
from trainer.config import EVALUATION_BACKENDS
from trainer.predict import split_recipe_argument


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="COCO bbox and segm AP of a checkpoint on the recipe's val set.",
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        help="the recipe the checkpoint was trained with (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="work_dir, checkpoint folder or weights file"
    )
    parser.add_argument("--out", help="output folder (default: <work_dir>/eval)")
    parser.add_argument(
        "--per-class", action="store_true", help="also report AP and AP50 of every class"
    )
    parser.add_argument(
        "--backend",
        choices=EVALUATION_BACKENDS,
        help="COCOeval implementation; both give the same numbers "
        "(default: the recipe's evaluation.backend)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)
    split_recipe_argument(args)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from trainer.data import build_dataloader, build_dataset
    from trainer.engine.accelerator import build_inference_accelerator
    from trainer.engine.checkpoint import CheckpointError
    from trainer.engine.logging import setup_logger
    from trainer.evaluation.coco import CocoEvaluator, per_class_table, summary_table
    from trainer.evaluation.inference import inference_batches
    from trainer.export import onnx_export
    from trainer.weights.classes import ModelClasses
    from trainer.weights.pretrained import build_pretrained, pretrained_recipe
    from trainer.weights.read import read_weights

    if onnx_export(args.checkpoint) is not None:
        raise CheckpointError(
            f"{args.checkpoint}: an ONNX export, which trainer.predict and "
            "Detector.from_pretrained run; evaluate the checkpoint it was exported from."
        )
    weights = read_weights(args.checkpoint)
    cfg = pretrained_recipe(weights, args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.work_dir) / "eval"
    accelerator = build_inference_accelerator(cfg)
    logger = setup_logger(out, accelerator.is_main_process)

    with accelerator.main_process_first():
        dataset = build_dataset(cfg.data.val, train=False)
    model = build_pretrained(weights, cfg, ModelClasses.of_dataset(dataset))
    logger.info(
        "weights %s, val set %s (%d images), %d processes",
        weights.path,
        cfg.data.val.ann_file,
        len(dataset),
        accelerator.num_processes,
    )

    loader = build_dataloader(dataset, cfg.data.imgs_per_gpu, cfg.data.workers_per_gpu, False)
    model, loader = accelerator.prepare(model, loader)
    evaluator = CocoEvaluator.for_dataset(
        dataset, accelerator, backend=args.backend or cfg.evaluation.backend
    )
    for _, targets, outputs in inference_batches(model, loader, accelerator, desc="evaluate"):
        evaluator.process([t["image_id"] for t in targets], outputs)
    metrics = evaluator.evaluate(per_class=args.per_class)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        written = evaluator.write_results(out)
        logger.info("\n%s", summary_table(metrics))
        if args.per_class:
            logger.info("per class:\n%s", per_class_table(metrics))
        names = ", ".join(path.name for path in written)
        logger.info("wrote metrics.json, %s to %s", names, out)
    return metrics


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
