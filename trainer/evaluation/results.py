"""Model outputs -> COCO result dicts (bbox xywh, score, category id, RLE segmentation).

Shared by the evaluator (which adds ``image_id``) and ``trainer.predict`` (which adds
``file_name``), so ``predictions.json`` has one format everywhere. :func:`task_results` cuts
such results down to what one COCO task scores, as ``{bbox,segm}_predictions.json`` hold them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def category_lookup(label_to_cat: dict[int, int]) -> torch.Tensor:
    """label -> category id as a table (int64 [max label + 1], -1 where unmapped), so a whole
    image's labels map in one indexing op."""
    lookup = torch.full((max(label_to_cat) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor(list(label_to_cat))] = torch.tensor(list(label_to_cat.values()))
    return lookup


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """bool [D, H, W] -> D compressed RLEs ``{"size": [H, W], "counts": str}``.

    pycocotools encodes a Fortran-ordered uint8 [H, W, D] stack in a single C call; str counts
    (not bytes) keep the results JSON-serialisable and pycocotools accepts them as they are.
    """
    stack = np.asfortranarray(masks.detach().cpu().permute(1, 2, 0).numpy(), np.uint8)
    return [
        {"size": rle["size"], "counts": rle["counts"].decode()} for rle in mask_utils.encode(stack)
    ]


def to_coco_results(
    output: dict[str, torch.Tensor], cat_lookup: torch.Tensor, with_masks: bool = True
) -> list[dict[str, Any]]:
    """One image's detections -> COCO result dicts.

    Args:
        output: ``boxes`` float [D, 4] xyxy pixels, ``labels`` int64 [D] in 1..K, ``scores``
            float [D] and, when ``with_masks``, ``masks`` bool [D, H, W].
        cat_lookup: from :func:`category_lookup`.
    Returns:
        D dicts with ``category_id``, ``bbox`` [x, y, w, h] (rounded to 0.01 px), ``score`` and,
        when ``with_masks``, ``segmentation`` (compressed RLE, str counts).
    """
    keys = ["boxes", "labels", "scores"] + (["masks"] if with_masks else [])
    # One device -> host copy per tensor per image; all work below is on CPU.
    out = {key: output[key].detach().cpu() for key in keys}
    num = len(out["scores"])
    if num == 0:
        return []

    labels = out["labels"].long()
    in_range = (labels >= 0) & (labels < len(cat_lookup))
    cat_ids = cat_lookup[labels.clamp(0, len(cat_lookup) - 1)]
    unmapped = ~in_range | (cat_ids < 0)
    if unmapped.any():
        raise ValueError(f"labels {labels[unmapped].unique().tolist()} have no category id")

    boxes = out["boxes"].double()
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1)
    # Hundredths of a pixel are far below annotation precision and keep predictions.json small.
    bboxes = np.round(xywh.numpy(), 2).tolist()
    results = [
        {"category_id": cat, "bbox": bbox, "score": score}
        for cat, bbox, score in zip(cat_ids.tolist(), bboxes, out["scores"].tolist(), strict=True)
    ]
    if with_masks:
        masks = out["masks"]
        if masks.dtype != torch.bool or masks.dim() != 3 or len(masks) != num:
            raise ValueError(
                f"masks must be bool [{num}, H, W], got {masks.dtype} {list(masks.shape)}"
            )
        for result, rle in zip(results, encode_masks(masks), strict=True):
            result["segmentation"] = rle
    return results


# The geometry each COCO task leaves out of its results.
_OTHER_GEOMETRY = {"bbox": "segmentation", "segm": "bbox"}


def task_results(results: Iterable[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of ``results`` with only the geometry that ``iou_type`` scores: no
    ``segmentation`` for "bbox", no ``bbox`` for "segm".

    ``COCO.loadRes`` takes a result's area from its ``bbox`` whenever one is there, so mask
    results that keep their boxes fall into box-area size ranges (APs, APm, APl); without the
    box it uses the mask area, as the segm task means. The copies also spare the caller's
    dicts, which ``loadRes`` writes into.
    """
    if iou_type not in _OTHER_GEOMETRY:
        raise ValueError(f"iou_type must be one of {tuple(_OTHER_GEOMETRY)}, got '{iou_type}'")
    drop = _OTHER_GEOMETRY[iou_type]
    return [{key: value for key, value in result.items() if key != drop} for result in results]
