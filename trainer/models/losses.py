"""Loss terms of the RPN and the RoI heads (Detectron2's defaults: L1 box losses)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def objectness_loss(logits: Tensor, is_positive: Tensor, normalizer: float) -> Tensor:
    """Binary cross-entropy over sampled anchors: logits [S], is_positive [S] bool."""
    return F.binary_cross_entropy_with_logits(logits, is_positive.float(), reduction="sum") / (
        normalizer
    )


def box_regression_loss(deltas: Tensor, targets: Tensor, normalizer: float) -> Tensor:
    """L1 over positive samples, [P, 4] each, summed and divided by the sample count.

    Dividing by all samples, not positives, keeps the weight of an image with few
    objects low (as Detectron2 does).
    """
    return F.l1_loss(deltas.float(), targets, reduction="sum") / normalizer


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross-entropy over sampled RoIs: logits [R, K+1], labels [R] (0 = background)."""
    return F.cross_entropy(logits.float(), labels)


def mask_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel sigmoid BCE on the ground-truth class's mask: [P, M, M] each.

    With no positive RoI the loss is 0 but still depends on the head, so every parameter
    gets a gradient and distributed training does not stall.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float(), targets)
