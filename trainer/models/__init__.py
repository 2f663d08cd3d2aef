"""Detector construction from the ``model`` section of a recipe."""

from __future__ import annotations

from omegaconf import DictConfig

from trainer.models.backbone import BACKBONES, TimmBackbone
from trainer.models.inference import compile_for_inference
from trainer.models.mask_rcnn import MaskRCNN
from trainer.registry import Registry, build

DETECTORS = Registry("detector", {"MaskRCNN": MaskRCNN})


def build_backbone(cfg: DictConfig) -> TimmBackbone:
    """``model.backbone`` -> the backbone its ``type`` names (a TimmBackbone by default)."""
    return build(BACKBONES, cfg)


def build_detector(cfg: DictConfig, num_classes: int | None = None):
    """``model`` section -> detector; ``num_classes`` fills in a recipe that leaves it null."""
    return build(DETECTORS, cfg, num_classes=num_classes)


__all__ = [
    "BACKBONES",
    "DETECTORS",
    "MaskRCNN",
    "build_backbone",
    "build_detector",
    "compile_for_inference",
]
