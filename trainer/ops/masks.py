"""Mask targets (ground truth cropped to boxes) and pasting predicted masks into images."""

from __future__ import annotations

import torch
from torch import Tensor


def crop_and_resize(masks: Tensor, mask_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Sample each box's region of its ground-truth mask on a size x size grid.

    Bilinear sampling at 2x2 points per output cell (pixel centres at +0.5, like RoIAlign
    with aligned=True), read straight from the uint8 masks, so no full-size float copy of
    the masks is made.

    Args:
        masks: [G, H, W] uint8/bool masks.
        mask_index: [R] int64, which mask each box reads.
        boxes: [R, 4] xyxy in mask pixels.
    Returns:
        [R, size, size] float in [0, 1].
    """
    num, height, width = boxes.shape[0], masks.shape[1], masks.shape[2]
    if num == 0:
        return boxes.new_zeros((0, size, size))
    points = 2 * size
    steps = (torch.arange(points, device=boxes.device, dtype=torch.float32) + 0.5) / points
    x1, y1, x2, y2 = boxes.float().unbind(dim=1)
    xs = x1[:, None] + steps[None] * (x2 - x1)[:, None] - 0.5  # [R, P] in pixel-index space
    ys = y1[:, None] + steps[None] * (y2 - y1)[:, None] - 0.5

    def neighbours(coords: Tensor, limit: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        coords = coords.clamp(-0.5, limit - 0.5)
        low = coords.floor()
        frac = coords - low
        low = low.long()
        return low.clamp(0, limit - 1), (low + 1).clamp(0, limit - 1), 1 - frac, frac

    x_lo, x_hi, wx_lo, wx_hi = neighbours(xs, width)
    y_lo, y_hi, wy_lo, wy_hi = neighbours(ys, height)
    flat = masks.reshape(masks.shape[0], -1)
    base = mask_index[:, None, None]

    def gather(y: Tensor, x: Tensor) -> Tensor:
        linear = (y[:, :, None] * width + x[:, None, :]).reshape(num, -1)
        return flat[base.reshape(num, 1), linear].reshape(num, points, points).float()

    value = (
        gather(y_lo, x_lo) * (wy_lo[:, :, None] * wx_lo[:, None, :])
        + gather(y_lo, x_hi) * (wy_lo[:, :, None] * wx_hi[:, None, :])
        + gather(y_hi, x_lo) * (wy_hi[:, :, None] * wx_lo[:, None, :])
        + gather(y_hi, x_hi) * (wy_hi[:, :, None] * wx_hi[:, None, :])
    )
    return torch.nn.functional.avg_pool2d(value[:, None], 2).squeeze(1)


def _interpolation_weights(low: Tensor, high: Tensor, pixels: Tensor, size: int) -> Tensor:
    """[N, P, size] bilinear weights of the `size` mask cells at pixels [N, P] (indices).

    Pixel centre p + 0.5 falls at u = (p + 0.5 - low) / (high - low) * size - 0.5 in mask
    cells; each cell contributes max(0, 1 - |u - cell|), so the mask is zero outside.
    """
    extent = (high - low).clamp(min=1e-3)
    u = (pixels + 0.5 - low[:, None]) / extent[:, None] * size - 0.5
    cells = torch.arange(size, device=low.device, dtype=torch.float32)
    return (1 - (u[:, :, None] - cells[None, None, :]).abs()).clamp(min=0)


def _windows(low: Tensor, high: Tensor, size: int, limit: int) -> tuple[Tensor, Tensor]:
    """First pixel and pixel count [N] of the span a box's pasted mask can reach: the box
    plus half a mask cell each side (where bilinear weights are still non-zero)."""
    margin = (high - low) / (2 * size) + 1
    start = (low - margin).floor().clamp(0, limit)
    stop = (high + margin).ceil().clamp(0, limit)
    return start.long(), (stop - start).long()


def paste_masks(
    masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5, chunk: int = 32
) -> Tensor:
    """Paste per-box mask probabilities into full images (Detectron2's paste: each pixel
    centre sampled bilinearly from the mask stretched over the exact box, zero outside).

    The resize is separable: weights_y [N, h, S] @ mask [N, S, S] @ weights_x^T [N, S, w],
    computed only over each box's window (h x w pixels around the box, not the whole
    image). Masks go in chunks of similar window size, so a chunk's common window is tight
    and the float temporaries stay small.

    Args:
        masks: [N, S, S] probabilities.
        boxes: [N, 4] xyxy in output pixels.
    Returns:
        [N, height, width] bool, thresholded at ``threshold``.
    """
    num, size = masks.shape[0], masks.shape[-1]
    out = torch.zeros((num, height, width), dtype=torch.bool, device=masks.device)
    if num == 0:
        return out
    boxes = boxes.float()
    x_start, x_count = _windows(boxes[:, 0], boxes[:, 2], size, width)
    y_start, y_count = _windows(boxes[:, 1], boxes[:, 3], size, height)
    order = torch.argsort(x_count * y_count, descending=True)
    # Each chunk's common window (the largest of its boxes'), all in one host read.
    counts = torch.stack((y_count, x_count), 1)[order]
    counts = torch.nn.functional.pad(counts, (0, 0, 0, -num % chunk))
    windows = counts.view(-1, chunk, 2).amax(1).tolist()
    for index, (win_h, win_w) in zip(order.split(chunk), windows):
        # Starts move left/up where needed so the common window stays inside the image (it
        # still covers each box's span).
        xs = x_start[index].clamp(max=width - win_w)[:, None] + torch.arange(
            win_w, device=out.device
        )
        ys = y_start[index].clamp(max=height - win_h)[:, None] + torch.arange(
            win_h, device=out.device
        )
        box = boxes[index]
        weights_x = _interpolation_weights(box[:, 0], box[:, 2], xs.float(), size)
        weights_y = _interpolation_weights(box[:, 1], box[:, 3], ys.float(), size)
        pasted = weights_y @ masks[index].float() @ weights_x.transpose(1, 2)
        out[index[:, None, None], ys[:, :, None], xs[:, None, :]] = pasted >= threshold
    return out
