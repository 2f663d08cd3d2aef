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
