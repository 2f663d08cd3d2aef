"""torchvision's Mask R-CNN weights in this project's model: the same detections."""

import pytest
import torch
import torch.nn.functional as F
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
    """torchvision's model with random weights that make detections: BatchNorm statistics
    and affine maps drawn at random (with ``weights=None`` torchvision uses BatchNorm2d, so
    eval() makes them count), and a classifier wide enough for ~1500 detections per image
    in ~10 classes to pass torchvision's 0.05 score threshold, with scores up to ~0.35. The
    100-detection cap then keeps the best 100 of each image (3 classes): the score gap at
    that cut (>= 1.7e-4 on the test's images) is far above the two models' score difference
    (~1e-6), so both keep the same ones."""
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
    # fp32: torchvision's own precision (the default, auto, is bf16 on CPUs with native bf16).
    ours = build_detector(load_recipe(RECIPE, ["model.inference_precision=fp32"]).model).eval()
    # torchvision's BatchNorm2d counts batches; its COCO weights' FrozenBatchNorm2d, like
    # ours, does not: the counters are the only tensors without a place here.
    state = {k: v for k, v in weights.state_dict.items() if not k.endswith("num_batches_tracked")}
    ours.load_state_dict(state, strict=True)

    # torchvision resizes inside the model, this project in the data pipeline: ours gets
    # each image resized as torchvision's transform does (shorter side to min_size, bilinear,
    # no antialiasing; on [0, 1] pixels, which is the same as on normalized ones since the
    # normalization is per channel affine) and returns results at the original size, as
    # torchvision's postprocess does. The first image is already at that size (torchvision's
    # resize is the identity), the second is enlarged to 352 x 256.
    torch.manual_seed(1)
    images = [torch.rand(3, 256, 320), torch.rand(3, 330, 240)]
    torchvision_model.transform.min_size = (256,)
    resized = [
        F.interpolate(
            image[None],
            scale_factor=256 / min(image.shape[-2:]),
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        for image in images
    ]
    assert [tuple(image.shape[-2:]) for image in resized] == [(256, 320), (352, 256)]
    with torch.no_grad():
        expected = torchvision_model(images)
        got = ours(resized, output_sizes=[tuple(image.shape[-2:]) for image in images])
    # Each of torchvision's detections is looked for among ours (same class, same box):
    # order among equal scores is free.
    for image, theirs, mine in zip(images, expected, got):
        assert len(theirs["boxes"]) == torchvision_model.roi_heads.detections_per_img
        same_class = theirs["labels"][:, None] == mine["labels"][None]
        overlap = box_iou(theirs["boxes"], mine["boxes"]) * same_class
        best, index = overlap.max(1)
        found = best > 0.999
        assert found.all() and len(mine["boxes"]) == len(theirs["boxes"])
        score_error = (theirs["scores"] - mine["scores"][index]).abs().max()
        assert score_error < 1e-5
        box_error = (theirs["boxes"] - mine["boxes"][index]).abs().max()
        assert box_error < 1e-3
        masks = theirs["masks"][:, 0] > 0.5
        assert mine["masks"].shape[-2:] == image.shape[-2:]
        agreement = (mine["masks"][index] == masks).float().mean()
        assert agreement > 0.9999, agreement
        # Per detection, so that a small mask's error is not lost among background pixels.
        inter = (mine["masks"][index] & masks).flatten(1).sum(1)
        union = (mine["masks"][index] | masks).flatten(1).sum(1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0).min()
        assert iou > 0.99, iou
        print(
            f"{len(theirs['boxes'])} detections, {int(found.sum())} matched: score error "
            f"{score_error:.2e}, box error {box_error:.2e} px, mask pixels agree "
            f"{agreement:.6f}, worst mask IoU {iou:.4f}"
        )


def test_not_a_torchvision_state_dict():
    with pytest.raises(ValueError, match="no roi_heads.box_predictor.cls_score.weight"):
        from_torchvision({"model": {"fc.weight": torch.zeros(2, 2)}}, "x.pth")


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
