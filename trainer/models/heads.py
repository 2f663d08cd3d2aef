"""The small networks on top of the pyramid: RPN head, box head, mask head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
            hidden = torch.relu(self.conv(feature))
            batch, _, height, width = hidden.shape
            logits.append(self.objectness(hidden).permute(0, 2, 3, 1).reshape(batch, -1))
            deltas.append(
                self.deltas(hidden)
                .view(batch, -1, 4, height, width)
                .permute(0, 3, 4, 1, 2)
                .reshape(batch, -1, 4)
            )
        return logits, deltas


class BoxHead(nn.Module):
    """Two fully connected layers, then class scores and class-specific box deltas.

    forward: pooled [R, C, S, S] -> (class logits [R, K + 1], deltas [R, K + 1, 4]);
    class 0 is background.
    """

    def __init__(self, channels: int, pool_size: int, fc_dim: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(channels * pool_size * pool_size, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_dim, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.relu(self.fc1(pooled.flatten(1)))
        hidden = torch.relu(self.fc2(hidden))
        return self.cls_score(hidden), self.bbox_pred(hidden).view(pooled.shape[0], -1, 4)


class MaskHead(nn.Module):
    """3x3 convs, a 2x transposed conv, then one mask logit map per class.

    forward: pooled [R, C, S, S] -> logits [R, K, 2S, 2S] (index k-1 for label k).
    """

    def __init__(self, channels: int, conv_dim: int, num_convs: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(channels if i == 0 else conv_dim, conv_dim, 3, padding=1),
                nn.ReLU(),
            ]
        self.convs = nn.Sequential(*layers)
        self.upsample = nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.predictor(torch.relu(self.upsample(self.convs(pooled))))
