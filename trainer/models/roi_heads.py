"""Box and mask heads on pooled proposals: sampling, losses and final detections."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.ops import batched_nms, remove_small_boxes

from trainer.models.heads import NORMS, BoxHead, MaskHead
from trainer.models.losses import box_regression_loss, classification_loss, mask_loss
from trainer.ops.boxes import (
    BoxCoder,
    batched_box_iou,
    clip_boxes,
    rank_within_groups,
)
from trainer.ops.masks import crop_and_resize
from trainer.ops.matcher import IGNORE, POSITIVE, match, sample
from trainer.ops.poolers import MultiLevelRoIAlign

# Detections narrower or shorter than this (pixels) are dropped, as in torchvision.
MIN_DETECTION_SIZE = 1e-2
# RoIs per head call at inference: bounds the memory of pooled features and head
# activations. The mask head's 256-wide 28x28 maps take 0.8 MB per RoI, and 64 at a time
# cost nothing in speed; the box head's fully connected layers want large matrices (a
# 7x7x256 input is 50 KB per RoI), so it takes 1024 at a time.
MASK_INFERENCE_CHUNK = 64
BOX_INFERENCE_CHUNK = 1024


class RoIHeads(nn.Module):
    """Classifies and refines proposals, and predicts a mask for each positive/detection.

    forward(features, proposals, valid, gt=None, image_sizes=None): with ``gt`` (training),
    :meth:`losses` -> dict of loss_cls, loss_bbox, loss_mask; else :meth:`predict` -> dict
    of flat detections ``boxes`` [D, 4], ``scores`` [D], ``labels`` [D] (1..K), ``image``
    [D] (batch index) and ``mask_probs`` [D, M, M]. Callers go through ``forward`` so that
    module hooks run (FSDP gathers a unit's parameters in its forward pre-hook).
    """

    def __init__(
        self,
        channels: int,
        strides: list[int],
        num_classes: int,
        batch_size_per_image: int,
        positive_fraction: float,
        fg_iou_thresh: float,
        box_coder_weights: list[float],
        box_pool_size: int,
        mask_pool_size: int,
        box_fc_dim: int,
        mask_conv_dim: int,
        num_mask_convs: int,
        num_box_convs: int,
        norm: str,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        pooler_aligned: bool = True,
        pooler_sampling_ratio: int = 0,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}.")
        self.num_classes = num_classes
        pooling = {"sampling_ratio": pooler_sampling_ratio, "aligned": pooler_aligned}
        self.box_pooler = MultiLevelRoIAlign(box_pool_size, strides, **pooling)
        self.mask_pooler = MultiLevelRoIAlign(mask_pool_size, strides, **pooling)
        self.box_head = BoxHead(
            channels, box_pool_size, box_fc_dim, num_classes, num_box_convs, norm
        )
        self.mask_head = MaskHead(channels, mask_conv_dim, num_mask_convs, num_classes, norm)
        self.box_coder = BoxCoder(tuple(box_coder_weights))
        self.mask_size = 2 * mask_pool_size
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.fg_iou_thresh = fg_iou_thresh
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @classmethod
    def from_config(
        cls, cfg: DictConfig, channels: int, strides: list[int], num_classes: int
    ) -> RoIHeads:
        """``model.roi_heads`` node -> heads pooling from maps of ``channels`` at ``strides``
        (``mask_thresh`` is the detector's: it applies where masks are pasted)."""
        return cls(
            channels,
            strides,
            num_classes,
            batch_size_per_image=cfg.batch_size_per_image,
            positive_fraction=cfg.positive_fraction,
            fg_iou_thresh=cfg.fg_iou_thresh,
            box_coder_weights=list(cfg.box_coder_weights),
            box_pool_size=cfg.box_pool_size,
            mask_pool_size=cfg.mask_pool_size,
            box_fc_dim=cfg.box_fc_dim,
            mask_conv_dim=cfg.mask_conv_dim,
            num_mask_convs=cfg.num_mask_convs,
            num_box_convs=cfg.num_box_convs,
            norm=cfg.norm,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
            pooler_aligned=cfg.pooler_aligned,
            pooler_sampling_ratio=cfg.pooler_sampling_ratio,
        )

    def forward(
        self,
        features: list[Tensor],
        proposals: Tensor,
        valid: Tensor,
        gt: dict[str, Tensor] | None = None,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if gt is not None:
            return self.losses(features, proposals, valid, gt)
        return self.predict(features, proposals, valid, image_sizes)

    def _box_head(self, pooled: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.box_head(pooled)

    def losses(
        self, features: list[Tensor], proposals: Tensor, valid: Tensor, gt: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """proposals [B, P, 4] with valid [B, P]; gt as built by MaskRCNN.pad_targets."""
        with torch.no_grad():
            # Ground truth boxes join the proposals so every object has a good sample early on.
            candidates = torch.cat((proposals, gt["boxes"]), dim=1)
            candidate_valid = torch.cat((valid, gt["valid"]), dim=1)
            iou = batched_box_iou(gt["boxes"], candidates)
            matched, labels = match(
                iou, gt["valid"], self.fg_iou_thresh, self.fg_iou_thresh, allow_low_quality=False
            )
            labels[~candidate_valid] = IGNORE
            index, sampled = sample(labels, self.batch_size_per_image, self.positive_fraction)
            image, column = sampled.nonzero(as_tuple=True)
            chosen = index[image, column]
            boxes = candidates[image, chosen]
            gt_index = matched[image, chosen]
            is_fg = labels[image, chosen] == POSITIVE
            if gt["boxes"].shape[1] > 0:
                classes = torch.where(is_fg, gt["labels"][image, gt_index], 0)
            else:
                classes = torch.zeros_like(gt_index)
            rois = torch.cat((image[:, None].to(boxes.dtype), boxes), dim=1)

        class_logits, deltas = self.box_pooler(features, rois, self._box_head)  # one fc pass
        fg = is_fg.nonzero().squeeze(1)
        with torch.no_grad():
            fg_classes = classes[fg]
            targets = self.box_coder.encode(gt["boxes"][image[fg], gt_index[fg]], boxes[fg])
        loss_box = box_regression_loss(deltas[fg, fg_classes], targets, max(rois.shape[0], 1))

        losses = {"loss_cls": classification_loss(class_logits, classes), "loss_bbox": loss_box}
        if gt["masks"] is None:
            # Boxes-only data: the mask head gets a zero loss (and zero gradients), so that
            # every parameter still takes part in the step, as distributed training needs.
            losses["loss_mask"] = sum(p.sum() for p in self.mask_head.parameters()) * 0.0
            return losses
        mask_logits = self.mask_pooler(
            features,
            rois[fg],
            lambda pooled, index: self.mask_head(pooled, fg_classes[index]),
            per_level=True,
        )
        with torch.no_grad():
            mask_targets = crop_and_resize(
                gt["masks"], gt["mask_offset"][image[fg]] + gt_index[fg], boxes[fg], self.mask_size
            )
        losses["loss_mask"] = mask_loss(mask_logits, mask_targets)
        return losses

    @torch.no_grad()
    def predict(
        self, features: list[Tensor], proposals: Tensor, valid: Tensor, image_sizes: Tensor
    ) -> dict[str, Tensor]:
        image, column = valid.nonzero(as_tuple=True)
        boxes = proposals[image, column]
        rois = torch.cat((image[:, None].to(boxes.dtype), boxes), dim=1)
        class_logits, deltas = self.box_pooler(
            features, rois, self._box_head, per_level=True, max_rois=BOX_INFERENCE_CHUNK
        )
        detections = self.detect(class_logits, deltas, boxes, image, image_sizes)

        det_boxes, det_labels, det_image = (detections[k] for k in ("boxes", "labels", "image"))
        det_rois = torch.cat((det_image[:, None].to(det_boxes.dtype), det_boxes), dim=1)
        mask_logits = self.mask_pooler(
            features,
            det_rois,
            lambda pooled, index: self.mask_head(pooled, det_labels[index]),
            per_level=True,
            max_rois=MASK_INFERENCE_CHUNK,
        )
        detections["mask_probs"] = torch.sigmoid(mask_logits.float())
        return detections

    def detect(
        self,
        class_logits: Tensor,
        deltas: Tensor,
        boxes: Tensor,
        image: Tensor,
        image_sizes: Tensor,
    ) -> dict[str, Tensor]:
        """Final boxes for the whole batch, as torchvision's ``postprocess_detections``.

        Args:
            class_logits: [R, K + 1]; deltas: [R, K + 1, 4]; boxes: [R, 4] proposals;
            image: [R] batch index of each proposal; image_sizes: [B, 2] (height, width).
        Returns:
            ``boxes`` [D, 4], ``scores`` [D], ``labels`` [D] (1..K) and ``image`` [D]: per
            image and class, scores above ``score_thresh``, boxes at least 0.01 px wide and
            tall, NMS, then the ``detections_per_img`` best per image, best first.
        """
        scores = torch.softmax(class_logits.float(), dim=1)[:, 1:]  # [R, K]
        decoded = self.box_coder.decode(deltas[:, 1:], boxes[:, None, :])  # [R, K, 4]
        decoded = clip_boxes(decoded, image_sizes[image])

        num_classes = self.num_classes
        flat_boxes = decoded.reshape(-1, 4)
        flat_scores = scores.reshape(-1)
        flat_image = image.repeat_interleave(num_classes)
        flat_label = torch.arange(1, num_classes + 1, device=image.device).repeat(image.numel())
        keep = torch.where(flat_scores > self.score_thresh)[0]
        keep = keep[remove_small_boxes(flat_boxes[keep], MIN_DETECTION_SIZE)]
        groups = flat_image[keep] * num_classes + flat_label[keep] - 1
        keep = keep[batched_nms(flat_boxes[keep], flat_scores[keep], groups, self.nms_thresh)]
        keep = keep[rank_within_groups(flat_image[keep]) < self.detections_per_img]
        return {
            "boxes": flat_boxes[keep],
            "scores": flat_scores[keep],
            "labels": flat_label[keep],
            "image": flat_image[keep],
        }
