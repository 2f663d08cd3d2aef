"""RoIAlign over a feature pyramid: each box is pooled from the level that suits its size."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align


def assign_levels(
    boxes: Tensor,
    min_level: int,
    max_level: int,
    canonical_size: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """FPN paper eq. 1: level = floor(4 + log2(sqrt(area) / 224)), clamped; [R, 4] -> [R]."""
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return levels.clamp(min_level, max_level).to(torch.int64) - min_level


class MultiLevelRoIAlign:
    """Pools [R, C, S, S] features for boxes given as rois [R, 5] (batch index, x1, y1, x2, y2).

    Uses ``aligned=True`` (half-pixel offset, Detectron2's default) and an adaptive sampling
    ratio (0), unlike torchvision's MultiScaleRoIAlign which is not aligned.
    """

    def __init__(self, output_size: int, strides: list[int], sampling_ratio: int = 0):
        self.output_size = output_size
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))
        self.sampling_ratio = sampling_ratio

    def __call__(self, features: list[Tensor], rois: Tensor) -> Tensor:
        num_rois, channels = rois.shape[0], features[0].shape[1]
        size = self.output_size
        if len(features) == 1:
            return roi_align(features[0], rois, size, self.scales[0], self.sampling_ratio, True)
        levels = assign_levels(rois[:, 1:], self.min_level, self.max_level)
        out = features[0].new_zeros((num_rois, channels, size, size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            pooled = roi_align(feature, rois[index], size, scale, self.sampling_ratio, True)
            out.index_copy_(0, index, pooled.to(out.dtype))
        return out
