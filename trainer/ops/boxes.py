"""Box encoding and batched IoU; the per-pair kernels come from torchvision.ops."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest log-scale change a decoded box may take (as in Detectron): exp(4.135) ~ 1000/16.
SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes xyxy boxes as (dx, dy, dw, dh) offsets from reference boxes and back.

    ``weights`` (wx, wy, ww, wh) scale the offsets so the regression targets have similar
    magnitude: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    """

    def __init__(self, weights: tuple[float, float, float, float]):
        self.weights = tuple(float(w) for w in weights)

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """boxes, reference: [..., 4] xyxy -> deltas [..., 4], computed in fp32."""
        boxes, reference = boxes.float(), reference.float()
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        x = boxes[..., 0] + 0.5 * w
        y = boxes[..., 1] + 0.5 * h
        return torch.stack(
            (
                wx * (x - ref_x) / ref_w,
                wy * (y - ref_y) / ref_h,
                ww * torch.log(w / ref_w),
                wh * torch.log(h / ref_h),
            ),
            dim=-1,
        )

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """deltas [..., 4] (broadcastable against reference [..., 4]) -> xyxy boxes, fp32."""
        deltas, reference = deltas.float(), reference.float()
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_x = reference[..., 0] + 0.5 * ref_w
        ref_y = reference[..., 1] + 0.5 * ref_h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=SCALE_CLAMP)
        dh = (deltas[..., 3] / wh).clamp(max=SCALE_CLAMP)
        x = dx * ref_w + ref_x
        y = dy * ref_h + ref_y
        half_w = 0.5 * torch.exp(dw) * ref_w
        half_h = 0.5 * torch.exp(dh) * ref_h
        return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=-1)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU between every pair, batched: [B, N, 4] x [B, M, 4] (or [M, 4]) -> [B, N, M]."""
    if boxes2.dim() == 2:
        boxes2 = boxes2.unsqueeze(0)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    top_left = torch.maximum(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    bottom_right = torch.minimum(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union.clamp(min=1e-6)


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip xyxy boxes [B, N, 4] to per-image (height, width) sizes [B, 2]."""
    h = image_sizes[:, 0, None].to(boxes.dtype)
    w = image_sizes[:, 1, None].to(boxes.dtype)
    zero = torch.zeros_like(w)
    return torch.stack(
        (
            boxes[..., 0].clamp(zero, w),
            boxes[..., 1].clamp(zero, h),
            boxes[..., 2].clamp(zero, w),
            boxes[..., 3].clamp(zero, h),
        ),
        dim=-1,
    )


def rank_within_groups(groups: Tensor) -> Tensor:
    """Position of each element among earlier elements of the same group: [N] -> [N].

    With elements sorted by score, ``rank < k`` keeps the top k of every group (image)
    in one vectorized step.
    """
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(groups.numel(), device=groups.device) - starts[sorted_groups]
    return rank


def scatter_per_image(
    values: Tensor, image_index: Tensor, rank: Tensor, num_images: int, width: int
) -> tuple[Tensor, Tensor]:
    """Place rows [N, ...] at (image, rank) of a padded [B, width, ...] tensor, with a mask."""
    out = values.new_zeros((num_images, width, *values.shape[1:]))
    valid = torch.zeros((num_images, width), dtype=torch.bool, device=values.device)
    out[image_index, rank] = values
    valid[image_index, rank] = True
    return out, valid
