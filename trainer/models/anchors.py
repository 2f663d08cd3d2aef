"""Anchor grids for the feature pyramid levels."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """One anchor size per level, several aspect ratios, one grid cell per feature pixel.

    Anchors at a location are centred on the cell's top-left corner times the stride and
    rounded like torchvision's, so the two produce identical grids.
    """

    def __init__(self, sizes: list[int], aspect_ratios: list[float]):
        super().__init__()
        self.sizes = list(sizes)
        self.aspect_ratios = list(aspect_ratios)
        self.cell_anchors = [self._cell_anchors(size) for size in self.sizes]
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def _cell_anchors(self, size: int) -> Tensor:
        """[A, 4] anchors centred at the origin (A = number of aspect ratios)."""
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float32)
        h_ratio = torch.sqrt(ratios)
        w_ratio = 1.0 / h_ratio
        ws = w_ratio * size
        hs = h_ratio * size
        return (torch.stack((-ws, -hs, ws, hs), dim=1) / 2).round()

    def forward(
        self, feature_shapes: list[tuple[int, int]], strides: list[int], device
    ) -> list[Tensor]:
        """Anchors per level: [H_l * W_l * A, 4] xyxy each.

        Within a level the order is (y, x, anchor), matching a head output of shape
        [B, A, H, W] permuted to [B, H, W, A].
        """
        key = (tuple(feature_shapes), tuple(strides), str(device))
        if key not in self._cache:
            levels = []
            for (height, width), stride, cell in zip(feature_shapes, strides, self.cell_anchors):
                xs = torch.arange(width, dtype=torch.float32, device=device) * stride
                ys = torch.arange(height, dtype=torch.float32, device=device) * stride
                y, x = torch.meshgrid(ys, xs, indexing="ij")
                shifts = torch.stack((x, y, x, y), dim=-1).reshape(-1, 1, 4)
                levels.append((shifts + cell.to(device)[None]).reshape(-1, 4))
            if len(self._cache) >= 32:  # multi-scale training sees many sizes
                self._cache.clear()
            self._cache[key] = levels
        return self._cache[key]
