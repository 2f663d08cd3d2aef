"""COCO box and mask evaluation with pycocotools.

:class:`CocoEvaluator` converts model outputs into COCO result dicts as soon as they arrive (masks
become RLE per image), so full-resolution masks never pile up in memory. :meth:`evaluate`
gathers the results of all Accelerate processes, drops repeated images, scores them with
``COCOeval`` on the main process only and broadcasts the metrics back to every process.

Metrics are ``COCOeval.stats[0:6]`` as fractions in [0, 1], named ``{iou_type}/{AP,AP50,AP75,
APs,APm,APl}``. As in pycocotools, a metric whose area range has no ground truth among the
evaluated images is -1; it is passed through (not NaN, so metrics stay JSON-serialisable) and
:func:`summary_table` shows it as "-".
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm")
# Names of COCOeval.stats[0:6], in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def summary_table(metrics: dict[str, float]) -> str:
    """Aligned text table of ``metrics`` (as from :meth:`CocoEvaluator.evaluate`) in percent.

    One row per iou type present in ``metrics``, columns AP AP50 AP75 APs APm APl; -1 ("no
    ground truth in this size range") is shown as "-".
    """
    lines = [f"{'':<6}" + "".join(f"{name:>7}" for name in METRIC_NAMES)]
    for iou_type in (t for t in IOU_TYPES if f"{t}/AP" in metrics):
        values = (metrics[f"{iou_type}/{name}"] for name in METRIC_NAMES)
        cells = (f"{100 * v:>7.1f}" if v >= 0 else f"{'-':>7}" for v in values)
        lines.append(f"{iou_type:<6}" + "".join(cells))
    return "\n".join(lines)


class CocoEvaluator:
    """Accumulates detections per image and scores them against a COCO ground truth.

    Args:
        coco_gt: ground truth; its images must carry ``height`` and ``width``.
        label_to_cat_id: model label (contiguous 1..K) -> category id of the annotation file.
        iou_types: any of ``"bbox"``, ``"segm"``.
        accelerator: when given with ``num_processes > 1``, results are gathered across
            processes in :meth:`evaluate`; every process must then call it.
    """

    summary_table = staticmethod(summary_table)

    def __init__(
        self,
        coco_gt: COCO,
        label_to_cat_id: dict[int, int],
        iou_types: tuple[str, ...] = IOU_TYPES,
        accelerator: Accelerator | None = None,
    ):
        unknown = set(iou_types) - set(IOU_TYPES)
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}: {iou_types}")
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        self.accelerator = accelerator
        # label -> category id as a table, so a whole image's labels map in one indexing op;
        # -1 marks labels missing from the mapping.
        self._cat_lookup = torch.full((max(label_to_cat_id) + 1,), -1, dtype=torch.int64)
        self._cat_lookup[torch.tensor(list(label_to_cat_id))] = torch.tensor(
            list(label_to_cat_id.values())
        )
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        # image id -> that image's COCO results; keyed by id so a repeated image is kept once.
        self._results: dict[int, list[dict[str, Any]]] = {}
        # Results of all processes, set by evaluate() and invalidated by process().
        self._gathered: dict[int, list[dict[str, Any]]] | None = None

    def process(self, image_ids: list[int], outputs: list[dict[str, torch.Tensor]]) -> None:
        """Convert one batch of detections to COCO results and keep only those.

        ``outputs[i]`` belongs to ``image_ids[i]`` and holds, at the original image size:
        ``boxes`` float [D, 4] xyxy pixels, ``labels`` int64 [D] in 1..K, ``scores`` float [D]
        and, when "segm" is evaluated, ``masks`` bool [D, H, W]. An image with D = 0 still
        counts as evaluated. An image id seen before is skipped (distributed padding).
        """
        for image_id, output in zip(image_ids, outputs, strict=True):
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image id {image_id} is not in the ground truth")
            if image_id not in self._results:
                self._results[image_id] = self._to_coco(image_id, output)
        self._gathered = None

    def _to_coco(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One image's output -> COCO result dicts (image_id, category_id, bbox xywh, score
        and, for "segm", segmentation as compressed RLE with str counts)."""
        keys = ["boxes", "labels", "scores"] + (["masks"] if "segm" in self.iou_types else [])
        # One device -> host copy per tensor per image; all work below is on CPU.
        out = {key: output[key].detach().cpu() for key in keys}
        num = len(out["scores"])
        if num == 0:
            return []

        labels = out["labels"].long()
        in_range = (labels >= 0) & (labels < len(self._cat_lookup))
        cat_ids = self._cat_lookup[labels.clamp(0, len(self._cat_lookup) - 1)]
        unmapped = ~in_range | (cat_ids < 0)
        if unmapped.any():
            raise ValueError(f"labels {labels[unmapped].unique().tolist()} have no category id")

        boxes = out["boxes"].double()
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1)
        # Hundredths of a pixel are far below annotation precision and keep predictions.json small.
        bboxes = np.round(xywh.numpy(), 2).tolist()
        scores = out["scores"].tolist()
        results = [
            {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}
            for cat, bbox, score in zip(cat_ids.tolist(), bboxes, scores, strict=True)
        ]

        if "segm" in self.iou_types:
            masks = out["masks"]
            image = self.coco_gt.imgs[image_id]
            expected = (num, image["height"], image["width"])
            if masks.dtype != torch.bool or tuple(masks.shape) != expected:
                raise ValueError(
                    f"image {image_id}: masks must be bool {list(expected)}, "
                    f"got {masks.dtype} {list(masks.shape)}"
                )
            # pycocotools encodes a Fortran-ordered uint8 [H, W, D] stack in a single C call.
            rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy(), np.uint8))
            for result, rle in zip(results, rles, strict=True):
                # bytes counts are not JSON-serialisable; pycocotools accepts str as well.
                result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        return results

    @property
    def _distributed(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    def _all_results(self) -> dict[int, list[dict[str, Any]]]:
        """image id -> results over all processes, gathered once (a collective when distributed)."""
        if self._gathered is None:
            if self._distributed:
                # gather_object concatenates each process' list; (id, results) pairs keep every
                # image's results together so repeats can be dropped whole.
                self._gathered = {}
                for image_id, results in gather_object(list(self._results.items())):
                    # Distributed samplers pad the last batch with repeated images: keep one copy.
                    self._gathered.setdefault(image_id, results)
            else:
                self._gathered = self._results
        return self._gathered

    def evaluate(self) -> dict[str, float]:
        """Score everything processed (on every process, when distributed).

        Returns ``{"bbox/AP": ..., "segm/APl": ...}`` for the configured iou types, fractions in
        [0, 1] or -1 (no ground truth in that size range); all 0.0 when there are no detections.
        Only the processed images are scored, so a partial evaluation is judged on those alone.
        """
        per_image = self._all_results()
        metrics = None
        if self.accelerator is None or self.accelerator.is_main_process:
            metrics = self._score(per_image)
        if self._distributed:
            metrics = broadcast_object_list([metrics])[0]
        return metrics

    def _score(self, per_image: dict[int, list[dict[str, Any]]]) -> dict[str, float]:
        results = [result for image_results in per_image.values() for result in image_results]
        if not results:
            # COCO.loadRes cannot load an empty result list.
            return {f"{t}/{name}": 0.0 for t in self.iou_types for name in METRIC_NAMES}
        metrics = {}
        for iou_type in self.iou_types:
            # loadRes writes into the dicts it gets, and takes the area of any result carrying a
            # "bbox" from that box, so each iou type gets copies with only its own geometry
            # (as detectron2 does); otherwise mask area ranges would use box areas.
            drop = "segmentation" if iou_type == "bbox" else "bbox"
            dets = [{k: v for k, v in result.items() if k != drop} for result in results]
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval = COCOeval(self.coco_gt, self.coco_gt.loadRes(dets), iou_type)
                coco_eval.params.imgIds = sorted(per_image)
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
            stats = coco_eval.stats[: len(METRIC_NAMES)]
            metrics.update(
                {
                    f"{iou_type}/{name}": float(v)
                    for name, v in zip(METRIC_NAMES, stats, strict=True)
                }
            )
        return metrics

    def results(self) -> list[dict[str, Any]]:
        """COCO result dicts, ready for predictions.json: after :meth:`evaluate` those of all
        processes (every process holds them), before it this process' own."""
        per_image = self._gathered if self._gathered is not None else self._results
        return [result for image_results in per_image.values() for result in image_results]

    @property
    def predictions(self) -> list[dict[str, Any]]:
        """Same as :meth:`results`."""
        return self.results()
