"""Assigning ground truth to anchors or proposals, and sampling them for the losses.

Both work on a whole batch at once: ground truth is padded to [B, G] with a validity
mask, so there is no Python loop over images or boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEGATIVE = 0
POSITIVE = 1
IGNORE = -1


def match(
    iou: Tensor,
    gt_valid: Tensor,
    fg_thresh: float,
    bg_thresh: float,
    allow_low_quality: bool,
) -> tuple[Tensor, Tensor]:
    """Match each candidate to its best ground truth box.

    Args:
        iou: [B, G, N] IoU of ground truth (padded to G) with N candidates.
        gt_valid: [B, G] bool, False for padding.
        fg_thresh: IoU >= this is positive.
        bg_thresh: IoU < this is negative; in between is ignored.
        allow_low_quality: also make positive, for each ground truth box, the candidates
            with its highest IoU, so every box gets at least one (RPN).
    Returns:
        matched_gt: [B, N] int64 index into G (0 where there is no ground truth).
        labels: [B, N] int8 with POSITIVE / NEGATIVE / IGNORE.
    """
    batch, num_gt, num = iou.shape
    if num_gt == 0:
        zeros = torch.zeros((batch, num), dtype=torch.int64, device=iou.device)
        return zeros, torch.full((batch, num), NEGATIVE, dtype=torch.int8, device=iou.device)
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    best_iou, matched_gt = iou.max(dim=1)
    labels = torch.full_like(matched_gt, IGNORE, dtype=torch.int8)
    labels[best_iou < bg_thresh] = NEGATIVE
    labels[best_iou >= fg_thresh] = POSITIVE
    if allow_low_quality:
        # Ties count: every candidate that reaches a box's best IoU is kept.
        best_per_gt = iou.max(dim=2, keepdim=True).values
        is_best = (iou == best_per_gt) & gt_valid[:, :, None] & (best_per_gt > 0)
        labels[is_best.any(dim=1)] = POSITIVE
    return matched_gt, labels


def sample(labels: Tensor, num_samples: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Pick a random balanced subset of positives and negatives in each row.

    Args:
        labels: [B, N] with POSITIVE / NEGATIVE / IGNORE.
        num_samples: candidates per row in total.
        positive_fraction: at most this share are positives; negatives fill the rest.
    Returns:
        index: [B, S] int64 indices into N (S = num positives possible + num_samples).
        valid: [B, S] bool; at most ``num_samples`` True per row.
    """
    num = labels.shape[1]
    is_pos = labels == POSITIVE
    is_neg = labels == NEGATIVE
    max_pos = int(num_samples * positive_fraction)
    num_pos = is_pos.sum(dim=1).clamp(max=max_pos)
    num_neg = is_neg.sum(dim=1).clamp(max=num_samples - num_pos)

    def pick(candidates: Tensor, count: Tensor, width: int) -> tuple[Tensor, Tensor]:
        # Random keys in [0, 1) for candidates, -1 otherwise: the top `count` keys of a
        # row are a uniform random subset of its candidates.
        width = min(width, num)
        keys = torch.rand(candidates.shape, device=labels.device).masked_fill(~candidates, -1.0)
        index = keys.topk(width, dim=1).indices
        valid = torch.arange(width, device=labels.device)[None, :] < count[:, None]
        return index, valid

    pos_index, pos_valid = pick(is_pos, num_pos, max_pos)
    neg_index, neg_valid = pick(is_neg, num_neg, num_samples)
    return torch.cat((pos_index, neg_index), dim=1), torch.cat((pos_valid, neg_valid), dim=1)
