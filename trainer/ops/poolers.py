"""RoIAlign over a feature pyramid: each box is pooled from the level that suits its size."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from trainer.ops.roi_align import roi_align

HeadOutput = Tensor | tuple[Tensor, ...]


def assign_levels(
    boxes: Tensor,
    min_level: int,
    max_level: int,
    canonical_size: int = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> Tensor:
    """FPN paper eq. 1: level = floor(4 + log2(sqrt(area) / 224)), clamped; [R, 4] -> [R].

    Returns the level minus ``min_level``. Written as torchvision's LevelMapper: ``eps``
    is added to the level so a box whose size is a power of two times 224 up to rounding
    does not drop a level.
    """
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size) + eps)
    return levels.clamp(min_level, max_level).to(torch.int64) - min_level


class MultiLevelRoIAlign:
    """Pools [R, C, S, S] features for boxes given as rois [R, 5] (batch index, x1, y1, x2, y2).

    Defaults to ``aligned=True`` (half-pixel offset) with an adaptive sampling ratio (0),
    as Detectron2 does; torchvision's MultiScaleRoIAlign is ``aligned=False`` with 2x2
    samples per bin, which ``aligned=False, sampling_ratio=2`` reproduces.
    """

    def __init__(
        self, output_size: int, strides: list[int], sampling_ratio: int = 0, aligned: bool = True
    ):
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def __call__(
        self,
        features: list[Tensor],
        rois: Tensor,
        head: Callable[[Tensor, Tensor], HeadOutput] | None = None,
        per_level: bool = False,
        max_rois: int | None = None,
    ) -> HeadOutput:
        """Pool each RoI from its level and apply ``head`` to the pooled features.

        Args:
            features: per level [B, C, H_l, W_l].
            rois: [R, 5] (batch index, x1, y1, x2, y2) in image pixels.
            head: called as ``head(pooled, index)``, ``pooled`` [n, C, S, S] and ``index``
                [n] their rows in ``rois``; returns a tensor or a tuple of tensors with n
                rows. None: the pooled features themselves.
            per_level: call ``head`` on each level's RoIs apart, so the pooled features of
                all RoIs are never held at once; else once on all, pooled in level order
                (one set of weight gradients for a fully connected head).
            max_rois: with ``per_level``, at most this many RoIs per call (bounds the memory
                of a convolutional head at inference).
        Returns:
            the head's outputs, rows in the order of ``rois``.
        """
        size, ratio, aligned = self.output_size, self.sampling_ratio, self.aligned
        if len(features) == 1:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
        else:
            levels = assign_levels(rois[:, 1:], self.min_level, self.max_level)
        order = torch.argsort(levels, stable=True)
        counts = torch.bincount(levels, minlength=len(features)).tolist()
        head = head or (lambda pooled, index: pooled)
        pooled, outputs = [], []
        for feature, scale, index in zip(features, self.scales, order.split(counts)):
            if index.numel() == 0 and (pooled or outputs or rois.shape[0] > 0):
                continue  # an empty level adds nothing (one runs if there are no RoIs)
            if feature.device.type == "cpu":
                # The CPU RoIAlign reads fp32 channels-last maps: one conversion per level
                # here (none if already so), not one per chunk of RoIs; its pooled features
                # come out so too (and are cast as the head's layers want under autocast).
                feature = feature.to(torch.float32, memory_format=torch.channels_last)
            for part in index.split(max_rois or max(index.numel(), 1)) if per_level else [index]:
                level_pooled = roi_align(feature, rois[part], size, scale, ratio, aligned)
                if per_level:
                    outputs.append(head(level_pooled, part))
                else:
                    pooled.append(level_pooled)
        if not per_level:
            outputs = [head(torch.cat(pooled), order)]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts)[inverse] for parts in zip(*outputs))
        return torch.cat(outputs)[inverse]
