"""RoIAlign: torchvision's kernel on accelerators; on the CPU the same arithmetic as one
sparse matrix product, whose backward is another product instead of a serial scatter.

torchvision's CPU ``roi_align`` runs on one thread, and its backward (a scatter-add over
every sample of every RoI) was a quarter of a CPU training step. Bilinear pooling is linear
in the feature map, so for one level it is ``pooled = A @ features``, with ``A`` a sparse
[R * S * S, B * H * W] matrix of the bilinear weights; the backward is ``A^T @ grad``, both
multi-threaded sparse-dense products. The weights follow torchvision's kernel exactly
(sample positions, the half-pixel ``aligned`` offset, the adaptive sampling grid, the
border rules); tests/ops/test_roi_align.py compares both, forward and backward.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """torchvision.ops.roi_align's contract: features [B, C, H, W], rois [R, 5] (batch index,
    x1, y1, x2, y2 in image pixels) -> [R, C, S, S]. On the CPU, channels-last features give
    channels-last pooled features (no copies); give them that way when pooling repeatedly."""
    if features.device.type != "cpu":
        return torchvision_roi_align(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )
    # Computed in fp32 (as torchvision's autocast rule does), returned in the input's dtype.
    pooled = _SparsePooling.apply(
        features.float(), rois.detach().float(), output_size, spatial_scale, sampling_ratio, aligned
    )
    return pooled.to(features.dtype)


# RoIs per sparse product: bounds the channels-last temporaries (256 RoIs of 7x7x256 are
# 12.5 MB) without making the products too small to run well on several threads.
CHUNK = 256


class _SparsePooling(torch.autograd.Function):
    """features [B, C, H, W], rois [R, 5] -> [R, C, S, S] as ``A @ features``, in chunks
    of RoIs.

    Only the RoIs are saved: the backward rebuilds each chunk's ``A`` (a few milliseconds),
    so a step holds what torchvision's kernel holds and no sparse matrices.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # fp32, no autocast
    def forward(ctx, features, rois, size, scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.options = (features.shape, size, scale, sampling_ratio, aligned)
        batch, channels, height, width = features.shape
        # Channels-last maps (the layout of the products) in, channels-last pooled features
        # out, with no copy; other maps give contiguous NCHW, as torchvision's kernel does.
        ctx.channels_last = channels_last = _is_channels_last(features)
        # Pixels as rows, channels as columns: [B * H * W, C] (a view of channels-last maps).
        flat = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        num, bins = rois.shape[0], size * size
        if 0 < num <= CHUNK:
            pooled = torch.sparse.mm(_weights(rois, *ctx.options), flat)  # [R * S * S, C]
        else:
            pooled = flat.new_empty((num * bins, channels))
            for start in range(0, num, CHUNK):
                part = _weights(rois[start : start + CHUNK], *ctx.options)
                pooled[start * bins : (start + CHUNK) * bins] = torch.sparse.mm(part, flat)
        pooled = pooled.view(num, size, size, channels).permute(0, 3, 1, 2)
        return pooled if channels_last else pooled.contiguous()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        batch, channels, height, width = ctx.options[0]
        grad_flat = grad.new_zeros((batch * height * width, channels))
        for start in range(0, rois.shape[0], CHUNK):
            part = slice(start, start + CHUNK)
            grad_rows = grad[part].permute(0, 2, 3, 1).reshape(-1, channels)  # [n*S*S, C]
            weights = _weights(rois[part], *ctx.options)
            grad_flat.addmm_(weights.t(), grad_rows)
        grad_features = grad_flat.view(batch, height, width, channels).permute(0, 3, 1, 2)
        # In the features' layout: the gradients of a level's features are summed over the
        # RPN and both poolers, and a sum of two layouts allocates anew.
        if not ctx.channels_last:
            grad_features = grad_features.contiguous()
        return grad_features, None, None, None, None, None


def _is_channels_last(features: Tensor) -> bool:
    """Channels-last strides and not also contiguous NCHW (both hold when C or H * W is 1)."""
    return features.is_contiguous(memory_format=torch.channels_last) and not (
        features.is_contiguous()
    )


def _weights(rois, shape, size, scale, sampling_ratio, aligned) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return bilinear_weights(rois, shape, size, scale, sampling_ratio, aligned)


def bilinear_weights(
    rois: Tensor,
    shape: torch.Size,
    size: int,
    scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Sparse CSR [R * S * S, B * H * W]: row (r, i, j) averages the bilinear samples of bin
    (i, j) of RoI r, as torchvision's kernel places them.

    Each bin holds a g_h x g_w grid of samples (``sampling_ratio``, or ceil(RoI size / S) per
    axis when it is 0); a sample more than one pixel outside the map adds nothing, others
    are clamped to the map and interpolated from their 4 neighbours.
    """
    batch, _, height, width = shape
    device = rois.device
    num_rois = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    image = rois[:, 0].long()
    start_x, start_y = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - start_x
    roi_h = rois[:, 4] * scale - offset - start_y
    if not aligned:  # legacy: RoIs at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / size, roi_h / size
    if sampling_ratio > 0:
        grid_w = torch.full_like(image, sampling_ratio)
        grid_h = torch.full_like(image, sampling_ratio)
    else:
        grid_w = torch.ceil(roi_w / size).long().clamp(min=0)
        grid_h = torch.ceil(roi_h / size).long().clamp(min=0)
    count = (grid_h * grid_w).clamp(min=1).float()

    # One entry per sample, RoI-major, then bin row, bin column, sample row, sample column,
    # so that matrix rows come out sorted.
    per_roi = size * size * grid_h * grid_w
    roi = torch.repeat_interleave(torch.arange(num_rois, device=device), per_roi)
    first = torch.cumsum(per_roi, 0) - per_roi
    local = torch.arange(roi.numel(), device=device) - first[roi]
    gw, gh = grid_w[roi], grid_h[roi]
    sample_x, rest = local % gw, local // gw
    sample_y, rest = rest % gh, rest // gh
    bin_x, bin_y = rest % size, rest // size
    y = start_y[roi] + bin_y * bin_h[roi] + (sample_y + 0.5) * bin_h[roi] / gh
    x = start_x[roi] + bin_x * bin_w[roi] + (sample_x + 0.5) * bin_w[roi] / gw

    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y, x = y.clamp(min=0.0), x.clamp(min=0.0)
    y_low = y.long().clamp(max=height - 1)
    x_low = x.long().clamp(max=width - 1)
    y = torch.where(y_low >= height - 1, y_low.float(), y)  # on the last row: no interpolation
    x = torch.where(x_low >= width - 1, x_low.float(), x)
    y_high = (y_low + 1).clamp(max=height - 1)
    x_high = (x_low + 1).clamp(max=width - 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    weight = inside.float() / count[roi]

    base = image[roi] * (height * width)
    columns = torch.stack(
        (
            base + y_low * width + x_low,
            base + y_low * width + x_high,
            base + y_high * width + x_low,
            base + y_high * width + x_high,
        ),
        dim=1,
    ).reshape(-1)
    values = (torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=1) * weight[:, None]).reshape(
        -1
    )
    # Each bin row holds 4 entries per sample of its RoI's grid.
    row_lengths = torch.repeat_interleave(4 * grid_h * grid_w, size * size)
    crow = torch.zeros(row_lengths.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(row_lengths, 0, out=crow[1:])
    return torch.sparse_csr_tensor(
        crow,
        columns,
        values,
        (num_rois * size * size, batch * height * width),
        check_invariants=False,
    )
