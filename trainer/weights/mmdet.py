"""mmdetection 2.x / 3.x Mask R-CNN (``mask_rcnn_r50_fpn``) checkpoints, renamed to this
project's keys.

A checkpoint is ``{"state_dict": ..., "meta": ...}``; the class names are in
``meta["CLASSES"]`` (2.x) or ``meta["dataset_meta"]["classes"]`` (3.x). mmdetection puts
the background LAST in its classifier and has no background slot in its class-specific box
regression: both are reordered into this project's layout (background first). Its ResNet is
torchvision's ("pytorch" style), its RoI level mapping (finest scale 56 at P2 is
torchvision's 224 at P4) and box coding (stds 0.1, 0.1, 0.2, 0.2) are this project's.

The RPN needs no reordering: mmdetection's ``AnchorGenerator`` (scales [8], ratios
[0.5, 1, 2], strides 4..64) lays anchors out (y, x, ratio) with ratio = h / w, and its
``RPNHead`` reads ``rpn_reg`` channels as ``permute(1, 2, 0).reshape(-1, 4)`` (channel
a * 4 + coordinate) and ``rpn_cls`` as one sigmoid logit per anchor: this project's
``RPNHead`` and ``AnchorGenerator`` order. Its anchors are not rounded to whole pixels
(this project's, like torchvision's, are): proposals differ by a fraction of a pixel.
"""

from __future__ import annotations

import re

from trainer.weights.classes import ModelClasses
from trainer.weights.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES
from trainer.weights.source import SourceWeights, background_last_to_first

# (mmdetection pattern, our replacement): the first match wins.
NAME_TABLE: list[tuple[str, str]] = [
    (r"^backbone\.", "backbone.body."),
    (r"^neck\.lateral_convs\.(\d)\.conv\.", "fpn.fpn.inner_blocks.{0}.0."),
    (r"^neck\.fpn_convs\.(\d)\.conv\.", "fpn.fpn.layer_blocks.{0}.0."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.objectness."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.deltas."),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc1."),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc2."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_head.cls_score."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_head.bbox_pred."),
    # conv i of ours sits at convs.<2 i> (each conv is followed by its ReLU).
    (r"^roi_head\.mask_head\.convs\.(\d)\.conv\.", "roi_heads.mask_head.convs.{conv}."),
    (r"^roi_head\.mask_head\.upsample\.", "roi_heads.mask_head.upsample."),
    (r"^roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_head.predictor."),
]


def is_mmdet(checkpoint: dict) -> bool:
    state = checkpoint.get("state_dict")
    return isinstance(state, dict) and any(k.startswith("roi_head.bbox_head.") for k in state)


def rename(key: str) -> str | None:
    """mmdetection key -> ours, or None when it has no counterpart."""
    for pattern, replacement in NAME_TABLE:
        match = re.match(pattern, key)
        if match:
            index = int(match.group(1)) if match.groups() else 0
            return replacement.format(index, conv=2 * index) + key[match.end() :]
    return None


def mmdet_classes(meta: dict, num_classes: int | None) -> list[str] | None:
    """Class names from ``meta`` (2.x "CLASSES", 3.x "dataset_meta"/"classes"), else COCO's
    for an 80-class model, else None."""
    classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    if classes is not None:
        return list(classes)
    return list(COCO_CLASSES) if num_classes == len(COCO_CLASSES) else None


def from_mmdet(checkpoint: dict, path: str) -> SourceWeights:
    """An mmdetection Mask R-CNN checkpoint -> SourceWeights."""
    state, unused = {}, []
    for key, value in checkpoint["state_dict"].items():
        ours = rename(key)
        if ours is None:
            unused.append(key)
            continue
        state[ours] = value
    if not state:
        raise ValueError(f"'{path}' has no mmdetection Mask R-CNN parameter names.")
    num_classes = background_last_to_first(state, path)
    classes = mmdet_classes(checkpoint.get("meta") or {}, num_classes)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"'{path}' names {len(classes)} classes in its meta but its classifier has "
            f"{num_classes}."
        )
    weights = SourceWeights(state, classes, "mmdet", path, unused)
    if classes == COCO_CLASSES:  # results then carry COCO's own category ids
        weights.model_classes = ModelClasses(classes, list(COCO_CATEGORY_IDS))
    return weights
