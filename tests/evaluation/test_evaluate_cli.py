"""`python -m trainer.evaluate` end to end: metrics.json against plain pycocotools run on the
predictions.json it writes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import save_file

from trainer import evaluate
from trainer.config import load_recipe
from trainer.data.shapes import generate_shapes
from trainer.evaluation.coco import BACKENDS, METRIC_NAMES
from trainer.models import build_detector

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes/demo.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four 64 px val images and untrained demo-model weights; returns (root, overrides)."""
    root = tmp_path_factory.mktemp("evaluate")
    shapes = root / "shapes"
    generate_shapes(shapes, num_train=8, num_val=4, image_size=64)
    overrides = [
        f"work_dir={root / 'work'}",
        f"data.train.ann_file={shapes}/annotations/train.json",
        f"data.train.img_dir={shapes}/train",
        f"data.val.ann_file={shapes}/annotations/val.json",
        f"data.val.img_dir={shapes}/val",
        "data.train.type=CocoDataset",
        "data.val.type=CocoDataset",
        "data.workers_per_gpu=0",
        "model.roi_heads.detections_per_img=30",
    ]
    torch.manual_seed(0)
    model = build_detector(load_recipe(DEMO, overrides).model, num_classes=3)
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    return root, overrides


def _run(root, overrides, out: str, *flags: str) -> tuple[dict, list[dict]]:
    args = [DEMO, "--checkpoint", str(root / "weights.safetensors"), "--out", str(root / out)]
    evaluate.main([*args, *flags, *overrides])
    metrics = json.loads((root / out / "metrics.json").read_text())
    return metrics, json.loads((root / out / "predictions.json").read_text())


def _ground_truth_from(val_file, predictions: list[dict], per_image: int = 3) -> dict:
    """The val set with, as its annotations, each image's best-scoring detections that have a
    mask: an untrained model then scores in (0, 1) instead of 0 on both bbox and segm."""
    dataset = json.loads(val_file.read_text())
    annotations = []
    for image in dataset["images"]:
        own = [p for p in predictions if p["image_id"] == image["id"]]
        own = [p for p in own if mask_utils.area(p["segmentation"]) >= 4]
        for p in sorted(own, key=lambda p: -p["score"])[:per_image]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": p["category_id"],
                    "bbox": p["bbox"],
                    "segmentation": p["segmentation"],
                    "area": float(mask_utils.area(p["segmentation"])),
                    "iscrowd": 0,
                }
            )
    return {**dataset, "annotations": annotations}


def _pycocotools(gt_file, predictions: list[dict], iou_type: str, drop: str | None) -> dict:
    """Plain pycocotools on the written results; ``drop``: the geometry of the other task,
    removed as the COCO results format of each task has it."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        dets = [{k: v for k, v in p.items() if k != drop} for p in predictions]
        coco_eval = COCOeval(coco, coco.loadRes(dets), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {f"{iou_type}/{n}": float(v) for n, v in zip(METRIC_NAMES, coco_eval.stats[:6])}


def test_metrics_equal_pycocotools_on_the_written_predictions(tiny):
    root, overrides = tiny
    _, first = _run(root, overrides, "first")
    gt_file = root / "gt_from_detections.json"
    gt_file.write_text(json.dumps(_ground_truth_from(root / "shapes/annotations/val.json", first)))

    overrides = [*overrides, f"data.val.ann_file={gt_file}"]
    metrics, predictions = _run(root, overrides, "eval")
    assert predictions and set(predictions[0]) == {
        "image_id",
        "category_id",
        "bbox",
        "score",
        "segmentation",
    }
    reference = {
        **_pycocotools(gt_file, predictions, "bbox", drop="segmentation"),
        **_pycocotools(gt_file, predictions, "segm", drop="bbox"),
    }
    assert metrics == reference
    assert 0 < metrics["bbox/AP"] < 1 and 0 < metrics["segm/AP"] < 1

    # Loading the whole file as it is: box metrics are the same; for masks pycocotools then
    # takes the box area as the detection's area, which changes only the size-range metrics.
    as_is = {
        **_pycocotools(gt_file, predictions, "bbox", drop=None),
        **_pycocotools(gt_file, predictions, "segm", drop=None),
    }
    same = [f"bbox/{n}" for n in METRIC_NAMES] + ["segm/AP", "segm/AP50", "segm/AP75"]
    assert {k: metrics[k] for k in same} == {k: as_is[k] for k in same}

    # The other backend, with per-class AP: the same overall numbers.
    # (the recipe key; `--backend faster-coco-eval` on the command line does the same)
    faster, _ = _run(
        root, [*overrides, "evaluation.backend=faster-coco-eval"], "faster", "--per-class"
    )
    assert {k: v for k, v in faster.items() if k in metrics} == pytest.approx(metrics, abs=1e-12)
    per_class = [faster[f"segm/AP/{name}"] for name in ("circle", "square", "triangle")]
    present = [ap for ap in per_class if ap >= 0]
    assert sum(present) / len(present) == pytest.approx(metrics["segm/AP"], abs=1e-12)
    assert "circle" in (root / "faster/log.txt").read_text()  # the per-class table


def test_backend_choices_match_the_evaluator():
    assert evaluate.EVALUATION_BACKENDS == BACKENDS
    with pytest.raises(SystemExit):
        evaluate.parse_args([DEMO, "--checkpoint", "x", "--backend", "detectron2"])
