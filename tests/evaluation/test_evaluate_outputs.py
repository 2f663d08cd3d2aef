"""`python -m trainer.evaluate` writes one results file per task, which plain pycocotools
scores to metrics.json."""

from __future__ import annotations

import json

from tests.evaluation.test_evaluate_cli import DEMO, tiny  # noqa: F401 (a fixture)
from tests.evaluation.test_rescoring import _pycocotools
from trainer import evaluate
from trainer.evaluation.coco import METRIC_NAMES


def test_task_files_are_written_and_rescore_to_metrics_json(tiny):  # noqa: F811
    root, overrides = tiny
    out = root / "outputs"
    args = [DEMO, "--checkpoint", str(root / "weights.safetensors"), "--out", str(out)]
    metrics = evaluate.main([*args, *overrides])
    assert json.loads((out / "metrics.json").read_text()) == metrics

    combined = json.loads((out / "predictions.json").read_text())
    assert combined and all("bbox" in r and "segmentation" in r for r in combined)
    gt_file = root / "shapes/annotations/val.json"
    for iou_type, other in (("bbox", "segmentation"), ("segm", "bbox")):
        path = out / f"{iou_type}_predictions.json"
        results = json.loads(path.read_text())
        assert results == [{k: v for k, v in r.items() if k != other} for r in combined]
        rescored = _pycocotools(gt_file, path, iou_type)
        assert [rescored[k] for k in range(6)] == [
            metrics[f"{iou_type}/{name}"] for name in METRIC_NAMES
        ]
    assert "bbox_predictions.json, segm_predictions.json" in (out / "log.txt").read_text()
