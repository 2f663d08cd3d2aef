"""The written result files rescore to the logged metrics with plain pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.evaluation.coco import METRIC_NAMES, CocoEvaluator
from trainer.evaluation.results import task_results

H, W = 240, 320
LABEL_TO_CAT = {1: 1, 2: 5}


def _disk(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _rect(y1: int, x1: int, y2: int, x2: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _rod(y1: int, x1: int, length: int, thick: int = 3) -> np.ndarray:
    """A thin diagonal band: a small mask whose box is large."""
    yy, xx = np.mgrid[:H, :W]
    t = (yy - y1) - (xx - x1)
    inside = (xx >= x1) & (xx < x1 + length) & (yy >= y1) & (yy < y1 + length)
    return inside & (np.abs(t) <= thick)


def _scene() -> tuple[dict, list[dict]]:
    """Two images with small disks, medium and large objects and thin rods (small masks in
    large boxes); detections near each object plus false positives of every size. Returns the
    ground truth (COCO dict) and the per-image outputs."""
    gt_objects = {
        1: [
            (1, _disk(30, 30, 9)),
            (1, _disk(30, 80, 8)),
            (1, _disk(200, 40, 10)),
            (2, _rect(60, 120, 200, 300)),
            (2, _rod(20, 150, 110)),
            (1, _disk(170, 200, 22)),
        ],
        2: [
            (1, _disk(50, 50, 7)),
            (1, _disk(60, 250, 9)),
            (2, _rect(100, 20, 230, 180)),
            (2, _rod(100, 200, 120)),
            (1, _rod(10, 90, 80, 2)),
            (2, _rect(20, 120, 70, 190)),
        ],
    }
    # (label, mask, score) per image: shifted copies of the objects and false positives.
    detections = {
        1: [
            (1, np.roll(_disk(30, 30, 9), 2, axis=1), 0.95),
            (1, _disk(30, 80, 4), 0.6),  # too small a match at high IoU
            (1, np.roll(_disk(200, 40, 10), 1, axis=0), 0.8),
            (2, _rect(65, 125, 200, 300), 0.9),
            (2, np.roll(_rod(20, 150, 110), 1, axis=1), 0.7),
            (2, _rod(120, 10, 100), 0.85),  # false positive: small mask, large box
            (1, _disk(150, 100, 6), 0.5),  # false positive, small
            (1, np.roll(_disk(170, 200, 22), 3, axis=1), 0.62),
            (2, _rect(0, 0, 120, 110), 0.3),  # false positive, large
        ],
        2: [
            (1, _disk(50, 52, 7), 0.9),
            (1, np.roll(_disk(60, 250, 9), 5, axis=0), 0.75),
            (2, _rect(110, 30, 225, 180), 0.8),
            (2, _rod(100, 200, 120), 0.65),
            (1, _rod(10, 90, 80, 2), 0.55),
            (1, _rod(5, 200, 90), 0.92),  # false positive: small mask, large box
            (2, _disk(200, 280, 20), 0.4),  # false positive, medium
            (2, _rect(22, 118, 70, 188), 0.45),
        ],
    }
    images, annotations = [], []
    for image_id, objects in gt_objects.items():
        images.append({"id": image_id, "height": H, "width": W, "file_name": f"{image_id}.png"})
        for label, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": LABEL_TO_CAT[label],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                }
            )
    gt = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "drop"}, {"id": 5, "name": "plate"}],
    }
    outputs = {}
    for image_id, dets in detections.items():
        masks = torch.from_numpy(np.stack([mask for _, mask, _ in dets]))
        boxes = []
        for mask in masks:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        outputs[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor([label for label, _, _ in dets]),
            "scores": torch.tensor([score for _, _, score in dets]),
            "masks": masks,
        }
    return gt, outputs


def _pycocotools(gt_file, results_file, iou_type: str) -> dict[str, float]:
    """Plain pycocotools on a written file, all 12 stats."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        coco_eval = COCOeval(coco, coco.loadRes(str(results_file)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(enumerate(coco_eval.stats.tolist()))


def _all_stats(evaluator: CocoEvaluator, gt_file, iou_type: str) -> dict[int, float]:
    """All 12 stats of the evaluator's own COCOeval run, redone on its in-memory results."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        coco_eval = COCOeval(coco, coco.loadRes(evaluator.results(iou_type)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(enumerate(coco_eval.stats.tolist()))


@pytest.fixture()
def evaluated(tmp_path):
    gt, outputs = _scene()
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CAT)
    evaluator.process(list(outputs), list(outputs.values()))
    metrics = evaluator.evaluate()
    written = evaluator.write_results(tmp_path / "eval")
    return gt_file, evaluator, metrics, written


def test_the_case_has_small_medium_and_large_objects(evaluated):
    gt_file, _, metrics, _ = evaluated
    for iou_type in ("bbox", "segm"):
        values = [metrics[f"{iou_type}/{name}"] for name in METRIC_NAMES]
        assert all(0 < value < 1 for value in values), (iou_type, values)


def test_task_files_rescore_to_the_logged_metrics(evaluated, tmp_path):
    gt_file, evaluator, metrics, written = evaluated
    folder = tmp_path / "eval"
    assert [p.name for p in written] == [
        "predictions.json",
        "bbox_predictions.json",
        "segm_predictions.json",
    ]
    for iou_type in ("bbox", "segm"):
        rescored = _pycocotools(gt_file, folder / f"{iou_type}_predictions.json", iou_type)
        # The six logged metrics, and all twelve stats of the evaluator's scoring.
        logged = [metrics[f"{iou_type}/{name}"] for name in METRIC_NAMES]
        assert [rescored[k] for k in range(6)] == logged
        assert rescored == _all_stats(evaluator, gt_file, iou_type)

    segm = json.loads((folder / "segm_predictions.json").read_text())
    bbox = json.loads((folder / "bbox_predictions.json").read_text())
    assert segm and all("bbox" not in r and "segmentation" in r for r in segm)
    assert bbox and all("segmentation" not in r and "bbox" in r for r in bbox)


def test_combined_file_keeps_both_geometries_and_differs_only_in_segm_sizes(evaluated, tmp_path):
    """predictions.json stays the combined file; rescoring it as segm puts the rods' results
    in box-area ranges, which is why the per-task files exist."""
    gt_file, _, metrics, _ = evaluated
    combined = json.loads((tmp_path / "eval/predictions.json").read_text())
    assert {frozenset(r) for r in combined} == {
        frozenset({"image_id", "category_id", "bbox", "score", "segmentation"})
    }
    as_bbox = _pycocotools(gt_file, tmp_path / "eval/predictions.json", "bbox")
    assert [as_bbox[k] for k in range(6)] == [metrics[f"bbox/{n}"] for n in METRIC_NAMES]
    as_segm = _pycocotools(gt_file, tmp_path / "eval/predictions.json", "segm")
    logged = [metrics[f"segm/{n}"] for n in METRIC_NAMES]
    assert [as_segm[k] for k in range(3)] == logged[:3]
    assert [as_segm[k] for k in range(3, 6)] != logged[3:]


def test_boxes_only_evaluation_writes_no_segm_file(tmp_path):
    gt, outputs = _scene()
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CAT, iou_types=("bbox",))
    evaluator.process(list(outputs), list(outputs.values()))
    metrics = evaluator.evaluate()
    written = evaluator.write_results(tmp_path / "eval")
    assert [p.name for p in written] == ["predictions.json", "bbox_predictions.json"]
    rescored = _pycocotools(gt_file, tmp_path / "eval/bbox_predictions.json", "bbox")
    assert [rescored[k] for k in range(6)] == [metrics[f"bbox/{n}"] for n in METRIC_NAMES]


def test_task_results_keeps_only_the_task_geometry():
    result = {"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5}
    with_mask = {**result, "segmentation": {"size": [2, 2], "counts": "04"}}
    assert task_results([with_mask], "bbox") == [result]
    assert task_results([with_mask], "segm") == [
        {k: v for k, v in with_mask.items() if k != "bbox"}
    ]
    assert "bbox" in with_mask  # the caller's dict is left alone
    with pytest.raises(ValueError, match="iou_type"):
        task_results([with_mask], "keypoints")
