"""torchvision's Mask R-CNN weights in this project's model: the same detections."""

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops import box_iou

from trainer.config import load_recipe
from trainer.models import build_detector
from trainer.weights.coco_classes import TORCHVISION_COCO_CLASSES
from trainer.weights.read import from_checkpoint_dict
from trainer.weights.torchvision import from_torchvision, is_torchvision, rename

RECIPE = "recipes/mask_rcnn_torchvision.yaml"


@pytest.fixture(scope="module")
def torchvision_model():
    """torchvision's model with random weights that make a few dozen detections: BatchNorm
    statistics and affine maps drawn at random, and a classifier wide enough for scores to
    pass torchvision's 0.05 threshold."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.1)
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.3)
    return model


def test_name_table_covers_every_tensor(torchvision_model):
    state = torchvision_model.state_dict()
    assert is_torchvision(state) and is_torchvision({"model": state, "epoch": 3})
    weights = from_checkpoint_dict({"model": state, "optimizer": {}}, "tv.pth")
    assert weights.format == "torchvision"
    assert weights.classes == TORCHVISION_COCO_CLASSES
    ours = build_detector(load_recipe(RECIPE).model).state_dict()
    # Every tensor of ours comes from torchvision's (BatchNorm counters aside), same shape.
    wanted = {k for k in ours if not k.endswith("num_batches_tracked")}
    assert (
        set(weights.state_dict)
        - {k for k in weights.state_dict if k.endswith("num_batches_tracked")}
        == wanted
    )
    for key in wanted:
        assert weights.state_dict[key].shape == ours[key].shape, key
    # The mask logits lose torchvision's background row.
    logits = state["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(weights.state_dict["roi_heads.mask_head.predictor.weight"], logits[1:])
    assert weights.unused == []


def test_same_detections_as_torchvision(torchvision_model):
    weights = from_torchvision(torchvision_model.state_dict(), "tv.pth")
    ours = build_detector(load_recipe(RECIPE).model).eval()
    missing, unexpected = ours.load_state_dict(weights.state_dict, strict=False)
    assert missing == [] and all(k.endswith("num_batches_tracked") for k in unexpected)

    # Shorter side 256 in both images: torchvision's own resize is then the identity, and
    # both models see the same pixels (this project resizes in the data pipeline).
    torch.manual_seed(1)
    images = [torch.rand(3, 256, 320), torch.rand(3, 352, 256)]
    torchvision_model.transform.min_size = (256,)
    with torch.no_grad():
        expected = torchvision_model(images)
        got = ours(images)
    # Each of torchvision's detections is looked for among ours (same class, same box):
    # order among equal scores is free.
    for theirs, mine in zip(expected, got):
        assert len(theirs["boxes"]) >= 10
        same_class = theirs["labels"][:, None] == mine["labels"][None]
        overlap = box_iou(theirs["boxes"], mine["boxes"]) * same_class
        best, index = overlap.max(1)
        found = best > 0.999
        assert found.all() and len(mine["boxes"]) == len(theirs["boxes"])
        score_error = (theirs["scores"][found] - mine["scores"][index[found]]).abs().max()
        assert score_error < 1e-5
        box_error = (theirs["boxes"][found] - mine["boxes"][index[found]]).abs().max()
        assert box_error < 1e-3
        masks = theirs["masks"][found, 0] > 0.5
        agreement = (mine["masks"][index[found]] == masks).float().mean()
        assert agreement > 0.9999, agreement
        print(
            f"{len(theirs['boxes'])} detections, {int(found.sum())} matched: score error "
            f"{score_error:.2e}, box error {box_error:.2e} px, mask pixels agree {agreement:.5f}"
        )


def test_older_torchvision_names():
    # Before torchvision 0.13 the RPN conv and the mask head convs were bare Conv2d layers.
    assert rename("rpn.head.conv.weight") == "rpn.head.conv.weight"
    assert rename("roi_heads.mask_head.mask_fcn1.bias") == "roi_heads.mask_head.convs.0.bias"
    assert rename("roi_heads.mask_head.mask_fcn4.weight") == "roi_heads.mask_head.convs.6.weight"
    assert rename("roi_heads.mask_head.3.0.weight") == "roi_heads.mask_head.convs.6.weight"
    assert rename("rpn.head.conv.0.0.weight") == "rpn.head.conv.weight"
    assert rename("roi_heads.keypoint_head.0.weight") is None


def test_convert_then_fine_tune_keeps_coco_classes_by_name(torchvision_model, tmp_path):
    """convert_weights writes a folder Detector and load_from read; fine-tuning it on
    [person, dog, kayak] takes COCO's person (id 1) and dog (id 18) rows."""
    from trainer import Detector
    from trainer.tools import convert_weights
    from trainer.weights.read import read_weights
    from trainer.weights.transfer import transfer_weights

    source = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(torchvision_model.state_dict(), source)
    out = convert_weights.main(
        [str(source), str(tmp_path / "converted"), "--format", "torchvision"]
    )
    detector = Detector.from_pretrained(out, device="cpu")
    assert detector.classes == TORCHVISION_COCO_CLASSES
    assert detector.cfg.model.roi_heads.mask_paste == "torchvision"

    cfg = load_recipe(RECIPE, ["model.num_classes=3"])
    model = build_detector(cfg.model)
    report = transfer_weights(model, read_weights(out), ["person", "dog", "kayak"])
    assert report.kept_classes == ["person", "dog"] and report.new_classes == ["kayak"]
    cls = torchvision_model.roi_heads.box_predictor.cls_score.weight
    ours = model.roi_heads.box_head.cls_score.weight
    assert torch.equal(ours[1], cls[1]) and torch.equal(ours[2], cls[18])
    assert torch.equal(ours[0], cls[0])
    logits = torchvision_model.roi_heads.mask_predictor.mask_fcn_logits.weight
    assert torch.equal(model.roi_heads.mask_head.predictor.weight[1], logits[18])
