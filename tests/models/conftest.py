import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import ModelConfig
from trainer.models import build_detector


def small_model_config(**backbone):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.backbone.name = "resnet18"
    cfg.backbone.pretrained = False
    cfg.backbone.frozen_stages = 0
    cfg.backbone.frozen_bn = False
    cfg.backbone.merge_with(backbone)
    cfg.fpn_channels = 32
    cfg.rpn.anchor_sizes = [16, 32, 64, 128, 256]
    cfg.roi_heads.box_fc_dim = 64
    cfg.roi_heads.mask_conv_dim = 16
    cfg.roi_heads.num_mask_convs = 1
    return cfg


def lean_model_config(**backbone):
    """small_model_config with fewer proposals and sampled RoIs: quicker steps, and on an
    image with one object the positives weigh more in the box loss."""
    cfg = small_model_config(**backbone)
    cfg.rpn.pre_nms_top_n_train = cfg.rpn.pre_nms_top_n_test = 200
    cfg.rpn.post_nms_top_n_train = cfg.rpn.post_nms_top_n_test = 100
    cfg.roi_heads.batch_size_per_image = 64
    return cfg


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return build_detector(small_model_config(), num_classes=3)


def box_target(height: int, width: int, boxes: list[list[int]], labels: list[int]) -> dict:
    """Targets whose masks fill their (integer) boxes."""
    masks = torch.zeros((len(boxes), height, width), dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
    }
