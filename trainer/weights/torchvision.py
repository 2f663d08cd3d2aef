"""torchvision's Mask R-CNN (``maskrcnn_resnet50_fpn``, ``MaskRCNN`` with a ResNet-FPN
backbone) state dicts, renamed to this project's keys.

torchvision's layout of the class-specific layers is this project's (background row first),
except that its mask predictor also has a background row, which is dropped. Its COCO
weights have 91 outputs: the background and COCO's category ids 1..90, 10 of them unused.
"""

from __future__ import annotations

import re

from torch import Tensor

from trainer.weights.coco_classes import TORCHVISION_COCO_CLASSES
from trainer.weights.source import SourceWeights

# (torchvision pattern, our replacement), applied to the first that matches.
NAME_TABLE: list[tuple[str, str]] = [
    (r"^backbone\.body\.", "backbone.body."),
    (r"^backbone\.fpn\.", "fpn.fpn."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
    (r"^rpn\.head\.conv\.", "rpn.head.conv."),  # torchvision < 0.13: a bare Conv2d
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.deltas."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_heads.box_head.fc1."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_heads.box_head.fc2."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_heads.box_head.cls_score."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_heads.box_head.bbox_pred."),
    # mask_head.<i>.0 (Conv2dNormActivation) or mask_head.mask_fcn<i+1> (torchvision < 0.13):
    # conv i of ours sits at convs.<2 i> (each conv is followed by its ReLU).
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", "roi_heads.mask_head.convs.{conv}."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", "roi_heads.mask_head.convs.{fcn}."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "roi_heads.mask_head.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "roi_heads.mask_head.predictor."),
]
MASK_LOGITS = "roi_heads.mask_predictor.mask_fcn_logits."


def torchvision_state(checkpoint: dict) -> dict[str, Tensor]:
    """The model's state dict: the file itself, or under "model" as torchvision's detection
    reference scripts save it (``{"model", "optimizer", "lr_scheduler", "epoch", ...}``)."""
    return checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint


def is_torchvision(checkpoint: dict) -> bool:
    state = torchvision_state(checkpoint)
    return "roi_heads.box_predictor.cls_score.weight" in state and any(
        key.startswith("backbone.body.") for key in state
    )


def rename(key: str) -> str | None:
    """torchvision key -> ours, or None when it has no counterpart."""
    for pattern, replacement in NAME_TABLE:
        match = re.match(pattern, key)
        if match:
            index = int(match.group(1)) if match.groups() else 0
            prefix = replacement.format(conv=2 * index, fcn=2 * (index - 1))
            return prefix + key[match.end() :]
    return None


def from_torchvision(checkpoint: dict, path: str) -> SourceWeights:
    """A torchvision Mask R-CNN checkpoint -> SourceWeights (COCO's class names when it has
    torchvision's 91 COCO outputs)."""
    state, unused = {}, []
    for key, value in torchvision_state(checkpoint).items():
        ours = rename(key)
        if ours is None:
            unused.append(key)
            continue
        if key.startswith(MASK_LOGITS):
            value = value[1:]  # no background row here
        state[ours] = value
    if "roi_heads.box_head.cls_score.weight" not in state:
        raise ValueError(
            f"'{path}' is not a torchvision Mask R-CNN state dict: it has no "
            f"roi_heads.box_predictor.cls_score.weight (its first keys: {unused[:3]})."
        )
    outputs = state["roi_heads.box_head.cls_score.weight"].shape[0]
    classes = list(TORCHVISION_COCO_CLASSES) if outputs == 91 else None
    return SourceWeights(state, classes, "torchvision", path, unused)
