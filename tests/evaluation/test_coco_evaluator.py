"""CocoEvaluator against a tiny in-memory COCO ground truth and plain pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.evaluation import coco as coco_module
from trainer.evaluation.coco import METRIC_NAMES, CocoEvaluator, per_class_table, summary_table

# Non-contiguous category ids, as in real annotation files.
LABEL_TO_CAT = {1: 3, 2: 7}
CAT_TO_LABEL = {cat: label for label, cat in LABEL_TO_CAT.items()}


def _polygon_ann(image: dict, cat: int, polygon: list[float]) -> dict:
    xs, ys = polygon[0::2], polygon[1::2]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], image["height"], image["width"]))
    return {
        "image_id": image["id"],
        "category_id": cat,
        "segmentation": [polygon],
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }


def _rle_ann(image: dict, cat: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "image_id": image["id"],
        "category_id": cat,
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
        "bbox": mask_utils.toBbox(rle).tolist(),
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }


@pytest.fixture()
def gt_path(tmp_path):
    images = [
        {"id": 1, "width": 64, "height": 48, "file_name": "1.png"},
        {"id": 2, "width": 80, "height": 80, "file_name": "2.png"},
        {"id": 3, "width": 80, "height": 80, "file_name": "3.png"},
    ]
    yy, xx = np.mgrid[:80, :80]
    disk = (yy - 40) ** 2 + (xx - 40) ** 2 < 28**2
    # Rectangle plus a disk overlapping its corner: an irregular RLE mask.
    rectangle = (yy >= 10) & (yy < 30) & (xx >= 10) & (xx < 50)
    blob = rectangle | ((yy - 30) ** 2 + (xx - 45) ** 2 < 12**2)
    anns = [
        _polygon_ann(images[0], 3, [4, 4, 24, 4, 24, 20, 4, 20]),  # rectangle, small
        _polygon_ann(images[0], 7, [30, 10, 60, 10, 60, 40, 45, 40, 45, 25, 30, 25]),  # L-shape
        _polygon_ann(images[0], 3, [40, 30, 55, 30, 55, 45, 40, 45]),  # overlaps the L-shape
        _rle_ann(images[1], 7, disk),  # medium
        _polygon_ann(images[1], 3, [5, 70, 30, 50, 35, 78]),  # triangle
        _rle_ann(images[2], 3, blob),
        _polygon_ann(images[2], 7, [40, 40, 78, 40, 78, 78, 40, 78]),
    ]
    for ann_id, ann in enumerate(anns, start=1):
        ann["id"] = ann_id
    dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "blob"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    return path


def _load(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture()
def coco_gt(gt_path) -> COCO:
    return _load(gt_path)


def _gt_outputs(coco: COCO, image_id: int) -> dict[str, torch.Tensor]:
    """The ground truth of one image as a model output (score 1)."""
    anns = coco.imgToAnns[image_id]
    xywh = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float32)
    return {
        "boxes": torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1),
        "labels": torch.tensor([CAT_TO_LABEL[ann["category_id"]] for ann in anns]),
        "scores": torch.ones(len(anns)),
        "masks": torch.from_numpy(np.stack([coco.annToMask(ann) for ann in anns])).bool(),
    }


def _perturbed_outputs(coco: COCO, image_id: int, seed: int) -> dict[str, torch.Tensor]:
    """Ground truth shifted by a few pixels, random scores, plus one random false positive.

    Box coordinates stay multiples of 0.25, so rounding to hundredths is exact.
    """
    gen = torch.Generator().manual_seed(seed)
    out = _gt_outputs(coco, image_id)
    num, height, width = out["masks"].shape
    shifts = torch.randint(-4, 5, (num, 2), generator=gen)
    boxes = out["boxes"] + 0.25 * torch.randint(-16, 17, (num, 4), generator=gen)
    masks = torch.stack(
        [
            torch.roll(m, tuple(s.tolist()), dims=(0, 1))
            for m, s in zip(out["masks"], shifts, strict=True)
        ]
    )
    fp_mask = torch.zeros(1, height, width, dtype=torch.bool)
    fp_mask[0, 2:14, 30:44] = True
    return {
        "boxes": torch.cat((boxes, torch.tensor([[30.0, 2.0, 44.0, 14.0]]))),
        "labels": torch.cat((out["labels"], torch.randint(1, 3, (1,), generator=gen))),
        "scores": torch.rand(num + 1, generator=gen),
        "masks": torch.cat((masks, fp_mask)),
    }


def _empty_outputs(coco: COCO, image_id: int) -> dict[str, torch.Tensor]:
    image = coco.imgs[image_id]
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, image["height"], image["width"], dtype=torch.bool),
    }


def _evaluate(coco: COCO, image_ids: list[int], outputs: list[dict], **kwargs) -> CocoEvaluator:
    evaluator = CocoEvaluator(coco, LABEL_TO_CAT, **kwargs)
    evaluator.process(image_ids, outputs)
    return evaluator


def _reference_metrics(gt_path, image_ids: list[int], outputs: list[dict]) -> dict[str, float]:
    """Plain pycocotools on results built independently (one encode per mask)."""
    coco = _load(gt_path)
    metrics = {}
    for iou_type in ("bbox", "segm"):
        results = []
        for image_id, out in zip(image_ids, outputs, strict=True):
            for box, label, score, mask in zip(
                out["boxes"].tolist(),
                out["labels"].tolist(),
                out["scores"].tolist(),
                out["masks"],
                strict=True,
            ):
                result = {"image_id": image_id, "category_id": LABEL_TO_CAT[label], "score": score}
                if iou_type == "bbox":
                    result["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
                else:
                    result["segmentation"] = mask_utils.encode(
                        np.asfortranarray(mask.numpy().astype(np.uint8))
                    )
                results.append(result)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = COCOeval(coco, coco.loadRes(results), iou_type)
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = coco_eval.stats[: len(METRIC_NAMES)]
        metrics.update(
            {f"{iou_type}/{n}": float(v) for n, v in zip(METRIC_NAMES, stats, strict=True)}
        )
    return metrics


def test_ground_truth_as_predictions_is_perfect(coco_gt):
    image_ids = [1, 2, 3]
    evaluator = _evaluate(coco_gt, image_ids, [_gt_outputs(coco_gt, i) for i in image_ids])
    metrics = evaluator.evaluate()
    assert set(metrics) == {f"{t}/{n}" for t in ("bbox", "segm") for n in METRIC_NAMES}
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm"):
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(1.0, abs=1e-6)
        # No ground truth is large (> 96**2 px): pycocotools' -1 is passed through.
        assert metrics[f"{iou_type}/APl"] == -1.0
    assert len(evaluator.results()) == len(coco_gt.anns)
    assert {r["category_id"] for r in evaluator.results()} == {3, 7}
    json.dumps(evaluator.predictions)  # ready for predictions.json


def test_matches_plain_pycocotools(coco_gt, gt_path):
    image_ids = [1, 2, 3]
    outputs = [_perturbed_outputs(coco_gt, i, seed=i) for i in image_ids]
    evaluator = _evaluate(coco_gt, image_ids, outputs)
    metrics = evaluator.evaluate()
    reference = _reference_metrics(gt_path, image_ids, outputs)
    assert metrics == pytest.approx(reference, abs=1e-12)
    # Non-trivial: the perturbation must actually cost something.
    assert 0.0 < metrics["bbox/AP"] < 1.0 and 0.0 < metrics["segm/AP"] < 1.0

    results = evaluator.results()
    assert len(results) == sum(len(out["scores"]) for out in outputs)
    first = results[0]
    assert set(first) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert all(isinstance(v, float) for v in first["bbox"]) and isinstance(first["score"], float)
    assert isinstance(first["segmentation"]["counts"], str)
    # results() are never mutated by loadRes (no "area"/"id" added).
    assert "area" not in first and "id" not in first


def test_no_detections_gives_zeros(coco_gt):
    evaluator = _evaluate(coco_gt, [1, 2], [_empty_outputs(coco_gt, i) for i in (1, 2)])
    metrics = evaluator.evaluate()
    assert metrics == {f"{t}/{n}": 0.0 for t in ("bbox", "segm") for n in METRIC_NAMES}
    assert evaluator.results() == []
    assert CocoEvaluator(coco_gt, LABEL_TO_CAT, ("bbox",)).evaluate() == {
        f"bbox/{n}": 0.0 for n in METRIC_NAMES
    }


def test_image_without_detections_counts_as_evaluated(coco_gt):
    perfect = [_gt_outputs(coco_gt, i) for i in (1, 2)]
    only_detected = _evaluate(coco_gt, [1, 2], perfect).evaluate()
    with_empty = _evaluate(coco_gt, [1, 2, 3], perfect + [_empty_outputs(coco_gt, 3)]).evaluate()
    assert only_detected["bbox/AP"] == pytest.approx(1.0)
    for iou_type in ("bbox", "segm"):
        assert with_empty[f"{iou_type}/AP"] < only_detected[f"{iou_type}/AP"]


def test_repeated_images_are_counted_once(coco_gt):
    image_ids = [1, 2, 3]
    outputs = [_perturbed_outputs(coco_gt, i, seed=i) for i in image_ids]
    expected = _evaluate(coco_gt, image_ids, outputs).evaluate()

    evaluator = _evaluate(coco_gt, image_ids, outputs)
    evaluator.process([1, 2], outputs[:2])  # distributed padding repeats the first samples
    assert len(evaluator.results()) == sum(len(out["scores"]) for out in outputs)
    assert evaluator.evaluate() == expected


def test_distributed_gather_drops_duplicates_and_broadcasts(coco_gt, monkeypatch):
    """Two simulated processes with overlapping (padded) images; gather/broadcast are faked."""
    outputs = {i: _perturbed_outputs(coco_gt, i, seed=i) for i in (1, 2, 3)}
    expected = _evaluate(coco_gt, [1, 2, 3], list(outputs.values())).evaluate()

    def make(is_main: bool, image_ids: list[int]) -> CocoEvaluator:
        accelerator = SimpleNamespace(num_processes=2, is_main_process=is_main)
        return _evaluate(
            coco_gt, image_ids, [outputs[i] for i in image_ids], accelerator=accelerator
        )

    payloads, broadcasts = [], []

    def fake_broadcast(objects, from_process=0):
        broadcasts.append(copy.deepcopy(objects))
        return [expected] if objects == [None] else objects

    monkeypatch.setattr(coco_module, "broadcast_object_list", fake_broadcast)
    monkeypatch.setattr(coco_module, "gather_object", lambda obj: payloads.append(obj) or obj)
    # The non-main process only sends its results and receives the main process' metrics.
    assert make(False, [2, 3, 2]).evaluate() == expected
    assert broadcasts == [[None]]

    rank1_payload = payloads[0]
    monkeypatch.setattr(coco_module, "gather_object", lambda obj: obj + rank1_payload)
    main = make(True, [1, 3])
    assert main.evaluate() == expected
    assert broadcasts[-1] == [expected]
    # Image 3 came from both processes but is kept once.
    assert Counter(r["image_id"] for r in main.results()) == {
        i: len(out["scores"]) for i, out in outputs.items()
    }


def test_summary_table(coco_gt):
    image_ids = [1, 2, 3]
    outputs = [_perturbed_outputs(coco_gt, i, seed=i) for i in image_ids]
    metrics = _evaluate(coco_gt, image_ids, outputs).evaluate()
    table = summary_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == list(METRIC_NAMES)
    assert [line.split()[0] for line in lines[1:]] == ["bbox", "segm"]
    for line, iou_type in zip(lines[1:], ("bbox", "segm"), strict=True):
        cells = line.split()[1:]
        assert cells[0] == f"{100 * metrics[f'{iou_type}/AP']:.1f}"
        assert cells[1] == f"{100 * metrics[f'{iou_type}/AP50']:.1f}"
        assert cells[-1] == "-"  # APl is -1: no large ground truth
    assert len({len(line) for line in lines}) == 1  # aligned
    assert CocoEvaluator.summary_table(metrics) == table


def _restricted_to_class(gt_path, results: list[dict], iou_type: str, cat: int) -> list[float]:
    """stats[0:2] (AP, AP50) of plain pycocotools evaluating one category only."""
    coco = _load(gt_path)
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    dets = [{k: v for k, v in r.items() if k != drop} for r in copy.deepcopy(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco, coco.loadRes(dets), iou_type)
        coco_eval.params.catIds = [cat]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats[:2]]


def test_per_class_matches_pycocotools_on_each_class_alone(coco_gt, gt_path):
    image_ids = [1, 2, 3]
    outputs = [_perturbed_outputs(coco_gt, i, seed=i) for i in image_ids]
    evaluator = _evaluate(coco_gt, image_ids, outputs)
    overall = evaluator.evaluate()
    metrics = evaluator.evaluate(per_class=True)
    # The overall metrics are unchanged; per-class keys are added in label order.
    assert {k: v for k, v in metrics.items() if k in overall} == overall
    names = {3: "square", 7: "blob"}
    assert [k for k in metrics if k.startswith("segm/AP/")] == ["segm/AP/square", "segm/AP/blob"]
    for iou_type in ("bbox", "segm"):
        for cat, name in names.items():
            ap, ap50 = _restricted_to_class(gt_path, evaluator.results(), iou_type, cat)
            assert metrics[f"{iou_type}/AP/{name}"] == pytest.approx(ap, abs=1e-12)
            assert metrics[f"{iou_type}/AP50/{name}"] == pytest.approx(ap50, abs=1e-12)
        # COCO's AP is the mean of the per-class APs.
        per_class = [metrics[f"{iou_type}/AP/{name}"] for name in names.values()]
        assert np.mean(per_class) == pytest.approx(metrics[f"{iou_type}/AP"], abs=1e-12)
    assert len({metrics[f"segm/AP/{name}"] for name in names.values()}) == 2


def test_per_class_of_a_class_without_ground_truth_is_minus_one(gt_path, tmp_path):
    # A third category that no annotation uses: COCOeval still has a column for it.
    dataset = json.loads(gt_path.read_text())
    dataset["categories"].append({"id": 9, "name": "ghost"})
    (tmp_path / "ghost.json").write_text(json.dumps(dataset))
    coco = _load(tmp_path / "ghost.json")
    evaluator = CocoEvaluator(coco, {**LABEL_TO_CAT, 3: 9})
    evaluator.process([1], [_gt_outputs(coco, 1)])
    metrics = evaluator.evaluate(per_class=True)
    assert metrics["segm/AP/ghost"] == -1.0 and metrics["bbox/AP50/ghost"] == -1.0
    assert metrics["segm/AP/square"] == pytest.approx(1.0)
    table = per_class_table(metrics)
    assert table.splitlines()[-1].split() == ["ghost", "-", "-", "-", "-"]


def test_per_class_with_no_detections_gives_zeros(coco_gt):
    metrics = _evaluate(coco_gt, [1], [_empty_outputs(coco_gt, 1)]).evaluate(per_class=True)
    assert metrics["bbox/AP/square"] == 0.0 and metrics["segm/AP50/blob"] == 0.0


def test_repeated_class_names_get_their_category_id(coco_gt):
    coco_gt.cats[7]["name"] = "square"
    evaluator = _evaluate(coco_gt, [1], [_gt_outputs(coco_gt, 1)])
    metrics = evaluator.evaluate(per_class=True)
    assert "segm/AP/square (id 3)" in metrics and "segm/AP/square (id 7)" in metrics


def test_per_class_table(coco_gt):
    image_ids = [1, 2, 3]
    outputs = [_perturbed_outputs(coco_gt, i, seed=i) for i in image_ids]
    metrics = _evaluate(coco_gt, image_ids, outputs).evaluate(per_class=True)
    lines = per_class_table(metrics).splitlines()
    assert lines[0].split() == ["class", "bbox", "AP", "bbox", "AP50", "segm", "AP", "segm", "AP50"]
    assert [line.split()[0] for line in lines[1:]] == ["square", "blob"]
    cells = lines[2].split()[1:]
    assert cells == [
        f"{100 * metrics[f'{t}/{n}/blob']:.1f}" for t in ("bbox", "segm") for n in ("AP", "AP50")
    ]
    assert len({len(line) for line in lines}) == 1  # aligned
    with pytest.raises(ValueError, match="per_class=True"):
        per_class_table({k: v for k, v in metrics.items() if k.count("/") == 1})


def test_faster_coco_eval_backend_gives_the_same_metrics(coco_gt):
    pytest.importorskip("faster_coco_eval")
    image_ids = [1, 2, 3]
    outputs = [_perturbed_outputs(coco_gt, i, seed=i) for i in image_ids]
    annotations = copy.deepcopy(coco_gt.anns)
    faster = _evaluate(coco_gt, image_ids, outputs, backend="faster-coco-eval").evaluate(
        per_class=True
    )
    # The ground truth the evaluator was given is left as it was.
    assert coco_gt.anns == annotations
    expected = _evaluate(coco_gt, image_ids, outputs).evaluate(per_class=True)
    assert faster == pytest.approx(expected, abs=1e-12)


def test_unknown_backend_is_refused(coco_gt):
    with pytest.raises(ValueError, match="pycocotools"):
        CocoEvaluator(coco_gt, LABEL_TO_CAT, backend="detectron2")
