"""Feature pyramid (P2-P6) on top of the backbone's stride 4..32 maps."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class FPN(nn.Module):
    """torchvision's FPN with a stride-2 max-pool level on top (P6, used by the RPN only).

    forward: list of [B, C_i, H_i, W_i] -> list of [B, out_channels, H_i, W_i] plus P6.
    """

    def __init__(self, in_channels: list[int], in_strides: list[int], out_channels: int):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.strides = list(in_strides) + [in_strides[-1] * 2]
        self.out_channels = out_channels

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        named = OrderedDict((str(i), f) for i, f in enumerate(features))
        return list(self.fpn(named).values())
