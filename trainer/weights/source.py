"""Detector weights from any supported source, in this project's parameter names.

A reader turns one foreign format into :class:`SourceWeights`: the state dict renamed to
this project's keys (``MaskRCNN.state_dict()``) and laid out as this project lays out the
class-specific layers, plus the class names when the source knows them.

Class-specific layers, for K classes (label k in 1..K is ``classes[k - 1]``):

- ``roi_heads.box_head.cls_score.{weight,bias}``: K + 1 rows, background first (row 0);
- ``roi_heads.box_head.bbox_pred.{weight,bias}``: (K + 1) * 4 rows, 4 per class in the
  same order (the background's 4 are never used);
- ``roi_heads.mask_head.predictor.{weight,bias}``: K rows, no background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.weights.classes import ModelClasses

# Class names that stand for an unused slot (torchvision's COCO layout keeps the 91 ids of
# the 2014 paper, 11 of them unused): they never match a class by name.
PLACEHOLDER_CLASSES = frozenset({"N/A", "__background__"})

CLASS_SPECIFIC = (
    "roi_heads.box_head.cls_score.weight",
    "roi_heads.box_head.cls_score.bias",
    "roi_heads.box_head.bbox_pred.weight",
    "roi_heads.box_head.bbox_pred.bias",
    "roi_heads.mask_head.predictor.weight",
    "roi_heads.mask_head.predictor.bias",
)


@dataclass
class SourceWeights:
    """Weights of a detector, renamed to this project's state dict keys.

    state_dict: this project's keys -> tensors (foreign keys without a counterpart are left
        out and listed in ``unused``).
    classes: names of labels 1..K in order, or None when the source does not say.
    format: "trainer", "torchvision", "detectron2" or "mmdet".
    path: where the weights came from (for messages).
    unused: foreign keys that have no counterpart here (e.g. a detectron2 keypoint head).
    recipe_yaml: the resolved recipe the weights were trained with (this project's only).
    model_classes: the full class list (category ids, masks trained) when the source is
        this project's.
    """

    state_dict: dict[str, Tensor]
    classes: list[str] | None
    format: str
    path: str
    unused: list[str] = field(default_factory=list)
    recipe_yaml: str | None = None
    model_classes: ModelClasses | None = None


def background_last_to_first(state: dict[str, Tensor], path: str) -> int | None:
    """Reorder, in place, class-specific layers laid out background LAST (detectron2,
    mmdetection) into this project's layout; return K, or None without a classifier.

    Theirs, in our keys: ``cls_score`` K + 1 rows [c_1..c_K, background]; ``bbox_pred``
    4 K rows (no background block), or 4 when class-agnostic; ``mask_head.predictor`` K
    rows, or 1 when class-agnostic. Class-agnostic layers become K identical blocks, which
    predict the same. Another row count is a ValueError naming ``path`` and the key.
    """
    classifier = state.get("roi_heads.box_head.cls_score.weight")
    if classifier is None:
        return None
    num_classes = classifier.shape[0] - 1
    for kind in ("weight", "bias"):
        key = f"roi_heads.box_head.cls_score.{kind}"
        if key in state:
            state[key] = torch.cat([state[key][-1:], state[key][:-1]])
        for key, per_class in (
            (f"roi_heads.box_head.bbox_pred.{kind}", 4),
            (f"roi_heads.mask_head.predictor.{kind}", 1),
        ):
            if key not in state:
                continue
            value = state[key]
            if value.shape[0] == per_class and num_classes > 1:
                value = value.repeat(num_classes, *[1] * (value.dim() - 1))
            if value.shape[0] != per_class * num_classes:
                raise ValueError(
                    f"'{path}': {key} has {value.shape[0]} rows; its classifier's {num_classes} "
                    f"classes need {per_class} x {num_classes} (or {per_class}, class-agnostic)."
                )
            if key.startswith("roi_heads.box_head.bbox_pred."):
                value = torch.cat([torch.zeros_like(value[:4]), value])  # never used
            state[key] = value
    return num_classes
