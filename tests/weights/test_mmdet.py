"""mmdetection Mask R-CNN checkpoints (random weights in its parameter names and layout)."""

import pytest
import torch
from torchvision.models import resnet50

from trainer.config import load_recipe
from trainer.models import build_detector
from trainer.weights.coco_classes import COCO_CLASSES
from trainer.weights.read import read_weights

RECIPE = "recipes/mask_rcnn_mmdet.yaml"


def mmdet_state_dict(num_classes: int = 80) -> dict[str, torch.Tensor]:
    """mask_rcnn_r50_fpn's parameters as mmdetection names them (its ResNet's names are
    torchvision's), random values."""
    torch.manual_seed(0)
    # mmdetection's ResNet has no classifier (fc).
    resnet = resnet50().state_dict()
    state = {f"backbone.{k}": v for k, v in resnet.items() if not k.startswith("fc.")}
    for i, width in enumerate((256, 512, 1024, 2048)):
        state[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(256, width, 1, 1)
        state[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(256)
        state[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3)
        state[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(256)
    shapes = {
        "rpn_head.rpn_conv": (256, 256, 3, 3),
        "rpn_head.rpn_cls": (3, 256, 1, 1),
        "rpn_head.rpn_reg": (12, 256, 1, 1),
        "roi_head.bbox_head.shared_fcs.0": (1024, 256 * 7 * 7),
        "roi_head.bbox_head.shared_fcs.1": (1024, 1024),
        "roi_head.bbox_head.fc_cls": (num_classes + 1, 1024),
        "roi_head.bbox_head.fc_reg": (num_classes * 4, 1024),
        **{f"roi_head.mask_head.convs.{i}.conv": (256, 256, 3, 3) for i in range(4)},
        "roi_head.mask_head.upsample": (256, 256, 2, 2),
        "roi_head.mask_head.conv_logits": (num_classes, 256, 1, 1),
    }
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.randn(shape)
        state[f"{name}.bias"] = torch.randn(shape[0])
    return state


@pytest.mark.parametrize("version", ["2.x", "3.x"])
def test_mmdet_checkpoint_loads_with_background_first(tmp_path, version):
    state = mmdet_state_dict()
    meta = (
        {"CLASSES": tuple(COCO_CLASSES)}
        if version == "2.x"
        else {"dataset_meta": {"classes": tuple(COCO_CLASSES)}}
    )
    path = tmp_path / "mask_rcnn_r50_fpn_1x_coco.pth"
    torch.save({"meta": meta, "state_dict": state}, path)

    weights = read_weights(path)
    assert weights.format == "mmdet" and weights.classes == COCO_CLASSES
    # COCO's category ids, with their gaps: "person" 1, "toothbrush" 90.
    assert (
        weights.model_classes.label_to_cat[1] == 1 and weights.model_classes.label_to_cat[80] == 90
    )
    model = build_detector(load_recipe(RECIPE).model)
    missing, unexpected = model.load_state_dict(weights.state_dict, strict=False)
    assert missing == [] and all(k.endswith("num_batches_tracked") for k in unexpected)
    ours = model.state_dict()
    cls, reg = state["roi_head.bbox_head.fc_cls.weight"], state["roi_head.bbox_head.fc_reg.weight"]
    # Background: their last row, our first; class k: their row k - 1, our row k.
    assert torch.equal(ours["roi_heads.box_head.cls_score.weight"][0], cls[80])
    assert torch.equal(ours["roi_heads.box_head.cls_score.weight"][1:], cls[:80])
    assert torch.equal(ours["roi_heads.box_head.bbox_pred.weight"][4:], reg)
    assert not ours["roi_heads.box_head.bbox_pred.weight"][:4].any()
    assert torch.equal(
        ours["roi_heads.mask_head.predictor.weight"], state["roi_head.mask_head.conv_logits.weight"]
    )
    assert torch.equal(
        ours["roi_heads.mask_head.convs.6.weight"], state["roi_head.mask_head.convs.3.conv.weight"]
    )
    assert torch.equal(
        ours["fpn.fpn.inner_blocks.3.0.weight"], state["neck.lateral_convs.3.conv.weight"]
    )
    assert torch.equal(
        ours["backbone.body.layer4.2.conv3.weight"], state["backbone.layer4.2.conv3.weight"]
    )


def test_mmdet_checkpoint_without_class_names(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"meta": {}, "state_dict": mmdet_state_dict(num_classes=3)}, path)
    weights = read_weights(path)
    assert weights.classes is None
    assert weights.state_dict["roi_heads.box_head.cls_score.weight"].shape[0] == 4
