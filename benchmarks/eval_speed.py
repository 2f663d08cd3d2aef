"""Wall time of COCO evaluation: our CocoEvaluator against plain pycocotools, and the
faster-coco-eval backend, on synthetic ground truth and predictions (boxes and RLE masks).

    python benchmarks/eval_speed.py [--images 5000] [--dets 100] [--size 480 640]
        [--runs plain ours faster]

The ground truth has COCO's shape: 80 categories, 1-15 objects per image (7.5 on average),
sides log-uniform in 8..300 px (so small, medium and large objects all occur), elliptical or
rectangular masks. Each image gets ``--dets`` detections: a jittered, sometimes mislabelled copy
of most objects plus false positives, all with masks, as a trained model's 100 per image.

Timed, each on the same results:
- ``ours``: ``CocoEvaluator.process`` (RLE encoding, done during inference, timed apart) and
  ``CocoEvaluator.evaluate()`` (bbox + segm, what the end of a val phase waits for);
- ``plain``: pycocotools alone on the evaluator's result dicts, as on a predictions.json:
  ``loadRes`` + ``COCOeval`` evaluate / accumulate / summarize, bbox then segm;
- ``faster``: ``CocoEvaluator(backend="faster-coco-eval").evaluate()``; its metrics are
  compared with pycocotools' (largest absolute difference printed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.evaluation.coco import METRIC_NAMES, CocoEvaluator

NUM_CLASSES = 80


def _draw_shape(mask: np.ndarray, box: np.ndarray, ellipse: bool) -> None:
    """Set an ellipse inscribed in, or the whole of, the xyxy box in the bool [H, W] mask."""
    x1, y1, x2, y2 = np.round(box).astype(int)
    if not ellipse:
        mask[y1:y2, x1:x2] = True
        return
    yy, xx = np.ogrid[y1:y2, x1:x2]
    cy, cx, ry, rx = (y1 + y2) / 2, (x1 + x2) / 2, max((y2 - y1) / 2, 1), max((x2 - x1) / 2, 1)
    mask[y1:y2, x1:x2] = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1


def _random_boxes(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    sides = np.exp(rng.uniform(np.log(8), np.log(300), (count, 2)))
    sides = np.minimum(sides, [width - 1, height - 1])
    x1 = rng.uniform(0, width - sides[:, 0])
    y1 = rng.uniform(0, height - sides[:, 1])
    return np.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], axis=1)


def make_ground_truth(rng: np.random.Generator, images: int, height: int, width: int) -> COCO:
    dataset = {
        "images": [{"id": i, "height": height, "width": width} for i in range(1, images + 1)],
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)],
        "annotations": [],
    }
    for image_id in range(1, images + 1):
        boxes = _random_boxes(rng, int(rng.integers(1, 16)), height, width)
        for box in boxes:
            mask = np.zeros((height, width, 1), dtype=np.uint8, order="F")
            _draw_shape(mask[:, :, 0], box, ellipse=bool(rng.integers(2)))
            rle = mask_utils.encode(mask)[0]
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, NUM_CLASSES + 1)),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def make_output(
    rng: np.random.Generator, coco: COCO, image_id: int, dets: int
) -> dict[str, torch.Tensor]:
    """One image's model output: jittered copies of ~90 % of the objects (20 % mislabelled),
    then false positives up to ``dets``."""
    image = coco.imgs[image_id]
    height, width = image["height"], image["width"]
    anns = [a for a in coco.imgToAnns[image_id] if rng.random() < 0.9][:dets]
    xywh = np.array([a["bbox"] for a in anns]).reshape(-1, 4)
    found = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    found += rng.normal(0, 0.08, found.shape) * np.tile(xywh[:, 2:], 2)
    labels = np.array([a["category_id"] for a in anns], dtype=np.int64)
    wrong = rng.random(len(labels)) < 0.2
    labels[wrong] = rng.integers(1, NUM_CLASSES + 1, wrong.sum())
    extra = dets - len(anns)
    boxes = np.concatenate([found, _random_boxes(rng, extra, height, width)])
    boxes = np.clip(boxes, 0, [width, height, width, height])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    labels = np.concatenate([labels, rng.integers(1, NUM_CLASSES + 1, extra)])
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(anns)), rng.uniform(0.05, 0.6, extra)])
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for mask, box in zip(masks, boxes):
        _draw_shape(mask, box, ellipse=bool(rng.integers(2)))
    return {
        "boxes": torch.from_numpy(boxes).float(),
        "labels": torch.from_numpy(labels),
        "scores": torch.from_numpy(scores).float(),
        "masks": torch.from_numpy(masks),
    }


def plain_pycocotools(coco: COCO, results: list[dict]) -> dict[str, float]:
    """What a user would run on predictions.json, per iou type keeping only its geometry."""
    metrics = {}
    for iou_type, drop in (("bbox", "segmentation"), ("segm", "bbox")):
        dets = [{k: v for k, v in r.items() if k != drop} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = COCOeval(coco, coco.loadRes(dets), iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics.update({f"{iou_type}/{n}": float(v) for n, v in zip(METRIC_NAMES, coco_eval.stats)})
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--runs", nargs="+", default=["plain", "ours", "faster"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    height, width = args.size

    coco = make_ground_truth(rng, args.images, height, width)
    label_to_cat = {c: c for c in range(1, NUM_CLASSES + 1)}
    print(
        f"{args.images} images {height}x{width}, {len(coco.anns)} objects, "
        f"{args.dets} detections per image, torch threads {torch.get_num_threads()}"
    )

    evaluator = CocoEvaluator(coco, label_to_cat)
    encode = 0.0
    for image_id in sorted(coco.imgs):
        output = make_output(rng, coco, image_id, args.dets)
        start = time.perf_counter()
        evaluator.process([image_id], [output])
        encode += time.perf_counter() - start
    results = evaluator.results()
    print(f"process (RLE-encode {len(results)} masks, during inference): {encode:.1f} s")

    timings, metrics = {}, {}
    for run in args.runs:
        start = time.perf_counter()
        if run == "plain":
            metrics[run] = plain_pycocotools(coco, results)
        elif run in ("ours", "faster"):
            # The same encoded results scored again; the first faster-coco-eval call also
            # converts the ground truth, as the first val phase of a run does.
            evaluator.backend = "faster-coco-eval" if run == "faster" else "pycocotools"
            metrics[run] = evaluator.evaluate()
        else:
            raise SystemExit(f"unknown run '{run}': use plain, ours or faster")
        timings[run] = time.perf_counter() - start
        print(
            f"{run:>6}: {timings[run]:6.1f} s   bbox/AP {metrics[run]['bbox/AP']:.4f}   "
            f"segm/AP {metrics[run]['segm/AP']:.4f}"
        )

    reference = metrics.get("plain") or metrics.get("ours")
    for run, values in metrics.items():
        if values is not reference and reference is not None:
            diff = max(abs(values[k] - reference[k]) for k in reference)
            print(f"{run}: largest metric difference from pycocotools {diff:.2e}")
    if "faster" in timings:
        base = timings.get("ours") or timings.get("plain")
        if base:
            print(f"faster-coco-eval: {base / timings['faster']:.1f}x faster")


if __name__ == "__main__":
    main()
