"""Region proposal network: anchors, objectness, proposals and the RPN losses."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.ops import batched_nms, remove_small_boxes

from trainer.models.anchors import AnchorGenerator
from trainer.models.heads import RPNHead
from trainer.models.losses import box_regression_loss, objectness_loss
from trainer.ops.boxes import (
    BoxCoder,
    batched_box_iou,
    clip_boxes,
    rank_within_groups,
    scatter_per_image,
)
from trainer.ops.matcher import POSITIVE, match, sample

# Proposals narrower or shorter than this (pixels) are dropped, as in torchvision.
MIN_PROPOSAL_SIZE = 1e-3


class RegionProposalNetwork(nn.Module):
    """Scores anchors on every pyramid level and turns the best into proposals.

    forward(features, image_sizes, gt) -> (proposals [B, P, 4], valid [B, P], losses);
    ``gt`` is the padded ground truth dict (see MaskRCNN) in training, else None.
    """

    def __init__(
        self,
        channels: int,
        strides: list[int],
        anchor_sizes: list[int],
        aspect_ratios: list[float],
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
    ):
        super().__init__()
        if len(anchor_sizes) != len(strides):
            raise ValueError(
                f"anchor_sizes has {len(anchor_sizes)} sizes but the pyramid has "
                f"{len(strides)} levels (strides {strides}): give one size per level."
            )
        self.strides = strides
        self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios)
        self.head = RPNHead(channels, self.anchor_generator.num_anchors_per_location)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh

    @classmethod
    def from_config(
        cls, cfg: DictConfig, channels: int, strides: list[int]
    ) -> RegionProposalNetwork:
        """``model.rpn`` node -> RPN on pyramid maps of ``channels`` at ``strides``."""
        return cls(
            channels,
            strides,
            anchor_sizes=list(cfg.anchor_sizes),
            aspect_ratios=list(cfg.aspect_ratios),
            fg_iou_thresh=cfg.fg_iou_thresh,
            bg_iou_thresh=cfg.bg_iou_thresh,
            batch_size_per_image=cfg.batch_size_per_image,
            positive_fraction=cfg.positive_fraction,
            pre_nms_top_n={"train": cfg.pre_nms_top_n_train, "test": cfg.pre_nms_top_n_test},
            post_nms_top_n={"train": cfg.post_nms_top_n_train, "test": cfg.post_nms_top_n_test},
            nms_thresh=cfg.nms_thresh,
        )

    def forward(
        self, features: list[Tensor], image_sizes: Tensor, gt: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(
            [tuple(f.shape[-2:]) for f in features], self.strides, features[0].device
        )
        with torch.no_grad():
            proposals, valid = self.select_proposals(logits, deltas, anchors, image_sizes)
        losses = {}
        if gt is not None:
            losses = self._losses(
                torch.cat(logits, dim=1), torch.cat(deltas, dim=1), torch.cat(anchors), gt
            )
        return proposals, valid, losses

    def select_proposals(
        self, logits: list[Tensor], deltas: list[Tensor], anchors: list[Tensor], image_sizes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Top-k per level, decode, clip, drop empty boxes, NMS per image and level, top-k
        per image (as torchvision's ``filter_proposals``, for the whole batch at once).

        Args:
            logits: per level [B, N_l]; deltas: per level [B, N_l, 4]; anchors: per level
                [N_l, 4]; image_sizes: [B, 2] (height, width).
        Returns:
            proposals [B, P, 4] xyxy, sorted by score within each image, and valid [B, P].
        """
        mode = "train" if self.training else "test"
        batch = logits[0].shape[0]
        boxes, scores, levels = [], [], []
        for level, (level_logits, level_deltas, level_anchors) in enumerate(
            zip(logits, deltas, anchors)
        ):
            k = min(self.pre_nms_top_n[mode], level_logits.shape[1])
            top_scores, top_index = level_logits.detach().topk(k, dim=1)
            top_deltas = level_deltas.detach().gather(1, top_index[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(top_deltas, level_anchors[top_index]))
            scores.append(top_scores.float())
            levels.append(torch.full((k,), level, device=top_index.device))
        boxes = clip_boxes(torch.cat(boxes, dim=1), image_sizes)  # [B, M, 4]
        scores = torch.cat(scores, dim=1)  # [B, M]
        num_levels, per_image = len(logits), boxes.shape[1]
        image_index = torch.arange(batch, device=boxes.device).repeat_interleave(per_image)
        groups = image_index * num_levels + torch.cat(levels).repeat(batch)
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        keep = remove_small_boxes(boxes, MIN_PROPOSAL_SIZE)
        keep = keep[batched_nms(boxes[keep], scores[keep], groups[keep], self.nms_thresh)]
        rank = rank_within_groups(image_index[keep])
        top = rank < self.post_nms_top_n[mode]
        keep, rank = keep[top], rank[top]
        width = min(self.post_nms_top_n[mode], per_image)
        return scatter_per_image(boxes[keep], image_index[keep], rank, batch, width)

    def _losses(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, gt: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """logits [B, N], deltas [B, N, 4], anchors [N, 4]; gt boxes [B, G, 4], valid [B, G].

        Both losses are sums over the sampled anchors divided by B x batch_size_per_image
        (Detectron2), so a batch short of candidates does not weigh more; torchvision
        divides by the number actually sampled and uses smooth L1 for the boxes.
        """
        batch = logits.shape[0]
        with torch.no_grad():
            iou = batched_box_iou(gt["boxes"], anchors)
            matched, labels = match(
                iou, gt["valid"], self.fg_iou_thresh, self.bg_iou_thresh, allow_low_quality=True
            )
            index, sampled = sample(labels, self.batch_size_per_image, self.positive_fraction)
            sampled_labels = labels.gather(1, index)
            positive = sampled & (sampled_labels == POSITIVE)
        normalizer = float(batch * self.batch_size_per_image)
        loss_cls = objectness_loss(
            logits.gather(1, index)[sampled].float(), positive[sampled], normalizer
        )
        if gt["boxes"].shape[1] == 0:
            return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": deltas.sum() * 0.0}
        with torch.no_grad():
            image, column = positive.nonzero(as_tuple=True)
            anchor_index = index[image, column]
            gt_boxes = gt["boxes"][image, matched[image, anchor_index]]
            targets = self.box_coder.encode(gt_boxes, anchors[anchor_index])
        loss_box = box_regression_loss(deltas[image, anchor_index], targets, normalizer)
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_box}
