"""The small networks on top of the pyramid: RPN head, box head, mask head."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fp32_at_inference(head: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``, in fp32 when ``head`` infers under autocast (bf16 / fp16 inference).

    For the small output layers whose values rank proposals and detections (objectness,
    class scores, box deltas): rounded to bf16 (8 bits of mantissa), near-equal scores tie
    and top-k and NMS choose among them at random. These layers are a few percent of the
    work. Training keeps the training loop's mixed precision.
    """
    if head.training or not torch.is_autocast_enabled(x.device.type):
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


class RPNHead(nn.Module):
    """Shared 3x3 conv, then per-anchor objectness and box deltas at every level.

    forward: list of [B, C, H, W] -> (objectness [B, H*W*A] per level,
    deltas [B, H*W*A, 4] per level), ordered (y, x, anchor) like the anchor grid.
    """

    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in features:
            hidden = torch.relu_(self.conv(feature))
            batch, _, height, width = hidden.shape
            objectness = fp32_at_inference(self, self.objectness, hidden)
            logits.append(objectness.permute(0, 2, 3, 1).reshape(batch, -1))
            deltas.append(
                fp32_at_inference(self, self.deltas, hidden)
                .view(batch, -1, 4, height, width)
                .permute(0, 3, 4, 1, 2)
                .reshape(batch, -1, 4)
            )
        return logits, deltas


# Normalization of the head convs: none, or GroupNorm (Detectron2's GN heads).
NORMS = ("none", "gn")


def conv_block(in_channels: int, out_channels: int, norm: str) -> list[nn.Module]:
    """3x3 conv, optional GroupNorm (32 groups, or fewer for narrow layers), ReLU.

    ReLUs here work in place: neither a conv's nor GroupNorm's backward needs its output.
    """
    if norm == "gn":
        groups = math.gcd(32, out_channels)
        return [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        ]
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]


def _init_convs(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class BoxHead(nn.Module):
    """Optional 3x3 convs (as wide as the input), two fully connected layers, then class
    scores and class-specific box deltas.

    forward: pooled [R, C, S, S] -> (class logits [R, K + 1], deltas [R, K + 1, 4]);
    class 0 is background.
    """

    def __init__(
        self,
        channels: int,
        pool_size: int,
        fc_dim: int,
        num_classes: int,
        num_convs: int = 0,
        norm: str = "none",
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += conv_block(channels, channels, norm)
        self.convs = nn.Sequential(*layers)
        _init_convs(self.convs)
        flat = channels * pool_size * pool_size
        self.fc1 = nn.Linear(flat, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.relu_(self.fc1(self.convs(pooled).flatten(1)))
        hidden = torch.relu_(self.fc2(hidden))
        scores = fp32_at_inference(self, self.cls_score, hidden)
        deltas = fp32_at_inference(self, self.bbox_pred, hidden)
        return scores, deltas.view(pooled.shape[0], -1, 4)


class MaskHead(nn.Module):
    """3x3 convs (optionally with GroupNorm), a 2x transposed conv, then the mask logits of
    each RoI's class.

    forward: pooled [R, C, S, S], labels [R] in 1..K -> logits [R, 2S, 2S]. The per-class
    1x1 predictor is applied for the given class only (the other K - 1 maps are never
    needed), which is the same as computing all K and selecting one.
    """

    def __init__(
        self, channels: int, conv_dim: int, num_convs: int, num_classes: int, norm: str = "none"
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += conv_block(channels if i == 0 else conv_dim, conv_dim, norm)
        self.convs = nn.Sequential(*layers)
        self.upsample = nn.ConvTranspose2d(conv_dim if num_convs else channels, conv_dim, 2, 2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        _init_convs(self)
        nn.init.normal_(self.predictor.weight, std=0.001)

    def forward(self, pooled: Tensor, labels: Tensor) -> Tensor:
        hidden = torch.relu_(self.upsample(self.convs(pooled)))  # [R, D, 2S, 2S]
        num, dim, height, width = hidden.shape
        weight = self.predictor.weight[labels - 1, :, 0, 0].to(hidden.dtype)  # [R, D]
        # One matrix-vector product per RoI, on a view of ``hidden`` in either layout (an
        # einsum copies channels-last maps to NCHW first).
        if hidden.is_contiguous():
            logits = torch.bmm(weight[:, None, :], hidden.view(num, dim, height * width))
        else:
            pixels = hidden.permute(0, 2, 3, 1).reshape(num, height * width, dim)
            logits = torch.bmm(pixels, weight[:, :, None])
        logits = logits.view(num, height, width)
        return logits + self.predictor.bias[labels - 1, None, None].to(logits.dtype)
