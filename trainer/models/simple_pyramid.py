"""Feature maps at the strides a backbone lacks, made from those it has (ViTDet-style)."""

from __future__ import annotations

import math

from timm.layers import LayerNorm2d
from torch import Tensor, nn


def _upsampler(channels: int, steps: int) -> tuple[nn.Module, int]:
    """``steps`` 2x transposed convs halving the channels each time, LayerNorm + GELU between
    (ViTDet's simple feature pyramid). Returns the module and its output channels."""
    layers: list[nn.Module] = []
    for step in range(steps):
        out = max(channels // 2, 8)
        if step > 0:
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, out, 2, stride=2))
        channels = out
    return nn.Sequential(*layers), channels


class SimplePyramid(nn.Module):
    """Completes a set of backbone maps to the wanted strides.

    A missing stride is made from the nearest coarser map by 2x transposed convs, or, when
    there is none, from the coarsest map by 2x max pooling. A plain ViT (one map at stride
    16) thus gets ViTDet's pyramid: 4x and 2x up, identity, 2x down.

    forward: list of [B, C_i, H/s_i, W/s_i] at ``in_strides`` -> list at ``strides``, with
    channels ``channels``.
    """

    def __init__(self, in_channels: list[int], in_strides: list[int], wanted: tuple[int, ...]):
        super().__init__()
        self.sources: list[int] = []  # index of the input map each output is made from
        self.makers = nn.ModuleList()
        self.channels: list[int] = []
        self.strides = sorted(set(wanted) | set(in_strides))
        for stride in self.strides:
            coarser = [i for i, s in enumerate(in_strides) if s >= stride]
            if coarser:
                source = min(coarser, key=lambda i: in_strides[i])
                steps = int(math.log2(in_strides[source] // stride))
                maker, channels = _upsampler(in_channels[source], steps)
            else:
                source = max(range(len(in_strides)), key=lambda i: in_strides[i])
                steps = int(math.log2(stride // in_strides[source]))
                maker = nn.Sequential(
                    *[nn.MaxPool2d(2, stride=2, ceil_mode=True) for _ in range(steps)]
                )
                channels = in_channels[source]
            self.sources.append(source)
            self.makers.append(maker)
            self.channels.append(channels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [maker(features[i]) for i, maker in zip(self.sources, self.makers)]
