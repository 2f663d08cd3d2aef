"""Detector construction from the ``model`` section of a recipe."""

from __future__ import annotations

from omegaconf import DictConfig

from trainer.config import RecipeError
from trainer.models.backbone import TimmBackbone
from trainer.models.mask_rcnn import MaskRCNN
from trainer.registry import Registry

HEAD_NORMS = ("none", "gn")
DETECTORS = Registry("detector", {"MaskRCNN": MaskRCNN})


def build_backbone(cfg: DictConfig) -> TimmBackbone:
    """``model.backbone`` -> TimmBackbone."""
    return TimmBackbone(
        name=cfg.name,
        pretrained=cfg.pretrained,
        checkpoint=cfg.checkpoint,
        frozen_stages=cfg.frozen_stages,
        frozen_bn=cfg.frozen_bn,
        sync_bn=cfg.sync_bn,
        out_indices=list(cfg.out_indices) if cfg.out_indices is not None else None,
        img_size=list(cfg.img_size) if cfg.img_size is not None else None,
    )


def build_detector(cfg: DictConfig, num_classes: int | None = None):
    """``model`` section -> detector; ``num_classes`` fills in a recipe that leaves it null."""
    num_classes = cfg.num_classes if cfg.num_classes is not None else num_classes
    if num_classes is None:
        raise RecipeError("model.num_classes is not set and no dataset gave the class count.")
    rpn, heads = cfg.rpn, cfg.roi_heads
    if heads.norm not in HEAD_NORMS:
        raise RecipeError(
            f"model.roi_heads.norm must be one of {list(HEAD_NORMS)}, got {heads.norm!r}."
        )
    return DETECTORS.get(cfg.type)(
        backbone=build_backbone(cfg.backbone),
        num_classes=num_classes,
        fpn_channels=cfg.fpn_channels,
        rpn=dict(
            anchor_sizes=list(rpn.anchor_sizes),
            aspect_ratios=list(rpn.aspect_ratios),
            fg_iou_thresh=rpn.fg_iou_thresh,
            bg_iou_thresh=rpn.bg_iou_thresh,
            batch_size_per_image=rpn.batch_size_per_image,
            positive_fraction=rpn.positive_fraction,
            pre_nms_top_n={"train": rpn.pre_nms_top_n_train, "test": rpn.pre_nms_top_n_test},
            post_nms_top_n={"train": rpn.post_nms_top_n_train, "test": rpn.post_nms_top_n_test},
            nms_thresh=rpn.nms_thresh,
        ),
        roi_heads=dict(
            batch_size_per_image=heads.batch_size_per_image,
            positive_fraction=heads.positive_fraction,
            fg_iou_thresh=heads.fg_iou_thresh,
            box_coder_weights=list(heads.box_coder_weights),
            box_pool_size=heads.box_pool_size,
            mask_pool_size=heads.mask_pool_size,
            box_fc_dim=heads.box_fc_dim,
            mask_conv_dim=heads.mask_conv_dim,
            num_mask_convs=heads.num_mask_convs,
            num_box_convs=heads.num_box_convs,
            norm=heads.norm,
            score_thresh=heads.score_thresh,
            nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
            mask_thresh=heads.mask_thresh,
        ),
    )


__all__ = ["DETECTORS", "MaskRCNN", "build_backbone", "build_detector"]
