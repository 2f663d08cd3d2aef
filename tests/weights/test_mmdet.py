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
    # What publish_model.py keeps: "meta" and "state_dict"; 2.x files are in torch's
    # legacy (non-zip) serialization.
    if version == "2.x":
        meta = {"mmdet_version": "2.0.0", "config": "model = dict(...)"}
        meta["CLASSES"] = tuple(COCO_CLASSES)
    else:
        palette = [(220, 20, 60)] * 80
        meta = {"dataset_meta": {"classes": tuple(COCO_CLASSES), "palette": palette}}
    path = tmp_path / "mask_rcnn_r50_fpn_1x_coco.pth"
    torch.save(
        {"meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=version == "3.x"
    )

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


def test_class_agnostic_heads_become_identical_class_blocks(tmp_path):
    """reg_class_agnostic=True (fc_reg: 4 rows) and class_agnostic masks (conv_logits: 1
    row): every class gets the same rows, so the predictions are the same."""
    state = mmdet_state_dict(num_classes=3)
    state["roi_head.bbox_head.fc_reg.weight"] = torch.randn(4, 1024)
    state["roi_head.bbox_head.fc_reg.bias"] = torch.randn(4)
    state["roi_head.mask_head.conv_logits.weight"] = torch.randn(1, 256, 1, 1)
    state["roi_head.mask_head.conv_logits.bias"] = torch.randn(1)
    path = tmp_path / "agnostic.pth"
    torch.save({"meta": {"CLASSES": ("a", "b", "c")}, "state_dict": state}, path)
    weights = read_weights(path).state_dict
    reg = weights["roi_heads.box_head.bbox_pred.weight"]
    assert reg.shape == (16, 1024) and not reg[:4].any()
    for k in range(1, 4):
        assert torch.equal(reg[4 * k : 4 * k + 4], state["roi_head.bbox_head.fc_reg.weight"])
    masks = weights["roi_heads.mask_head.predictor.bias"]
    assert torch.equal(masks, state["roi_head.mask_head.conv_logits.bias"].repeat(3))


def test_box_regression_of_another_class_count_is_named(tmp_path):
    state = mmdet_state_dict(num_classes=3)
    state["roi_head.bbox_head.fc_reg.weight"] = torch.randn(8, 1024)
    path = tmp_path / "odd.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    with pytest.raises(ValueError, match=r"odd\.pth.*bbox_pred\.weight has 8 rows"):
        read_weights(path)


class HistoryBuffer:
    """Stands for mmengine's logging buffer, which 3.x training checkpoints pickle."""


def test_a_training_checkpoint_with_code_objects_is_refused_by_name(tmp_path):
    path = tmp_path / "epoch_12.pth"
    torch.save(
        {"meta": {}, "state_dict": mmdet_state_dict(3), "message_hub": HistoryBuffer()}, path
    )
    with pytest.raises(ValueError, match=r"epoch_12\.pth.*it holds \S*HistoryBuffer"):
        read_weights(path)
