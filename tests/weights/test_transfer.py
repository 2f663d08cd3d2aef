"""Class-aware transfer of detector weights (head surgery) and its report."""

import torch

from tests.models.conftest import small_model_config
from trainer.models import build_detector
from trainer.weights.source import SourceWeights
from trainer.weights.transfer import match_classes, transfer_weights

SOURCE_CLASSES = ["person", "dog", "cat"]
TARGET_CLASSES = ["kayak", "Dog ", "person"]  # reordered, one new, one spelled differently


def model(num_classes: int, seed: int, **changes):
    torch.manual_seed(seed)
    cfg = small_model_config()
    for key, value in changes.items():
        cfg[key] = value
    return build_detector(cfg, num_classes=num_classes)


def test_match_classes_by_name_ignoring_case_spaces_and_placeholders():
    assert match_classes(SOURCE_CLASSES, TARGET_CLASSES) == {2: 2, 3: 1}
    # torchvision's COCO layout has "N/A" slots: never matched, even by a class named so.
    assert match_classes(["person", "N/A", "car"], ["N/A", "car"]) == {2: 3}


def test_head_surgery_copies_shared_classes_rows_in_the_new_order():
    source_model = model(3, seed=1)
    source = SourceWeights(source_model.state_dict(), SOURCE_CLASSES, "trainer", "src")
    target = model(3, seed=2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}

    report = transfer_weights(target, source, TARGET_CLASSES)

    src, out = source.state_dict, target.state_dict()
    # Classifier: rows are [background, label 1..K]; target labels: kayak=1, dog=2, person=3.
    for key in ("weight", "bias"):
        cls, src_cls = (
            out[f"roi_heads.box_head.cls_score.{key}"],
            src[f"roi_heads.box_head.cls_score.{key}"],
        )
        fresh_cls = fresh[f"roi_heads.box_head.cls_score.{key}"]
        assert torch.equal(cls[0], src_cls[0])  # background
        assert torch.equal(cls[1], fresh_cls[1])  # kayak: new
        assert torch.equal(cls[2], src_cls[2])  # dog <- source label 2
        assert torch.equal(cls[3], src_cls[1])  # person <- source label 1
        box, src_box = (
            out[f"roi_heads.box_head.bbox_pred.{key}"],
            src[f"roi_heads.box_head.bbox_pred.{key}"],
        )
        assert torch.equal(box[12:16], src_box[4:8])  # person's 4 deltas
        assert torch.equal(box[4:8], fresh[f"roi_heads.box_head.bbox_pred.{key}"][4:8])
        # Mask logits: K rows, label k at row k - 1.
        mask, src_mask = (
            out[f"roi_heads.mask_head.predictor.{key}"],
            src[f"roi_heads.mask_head.predictor.{key}"],
        )
        assert torch.equal(mask[2], src_mask[0])  # person
        assert torch.equal(mask[1], src_mask[1])  # dog
        assert torch.equal(mask[0], fresh[f"roi_heads.mask_head.predictor.{key}"][0])  # kayak
    # Everything that is not class-specific is the source's.
    shared = [
        k for k in out if "cls_score" not in k and "bbox_pred" not in k and "predictor" not in k
    ]
    assert all(torch.equal(out[k], src[k]) for k in shared)
    assert report.kept_classes == ["Dog ", "person"] and report.new_classes == ["kayak"]
    assert len(report.class_rows) == 6 and not report.missing and not report.reinitialised
    table = report.table()
    assert "2 classes kept (Dog , person); 1 new (kayak)" in table


def test_other_class_count_and_other_widths_are_reported_not_loaded():
    source_model = model(5, seed=1)
    # Without names on the source side, rows cannot be matched: different K -> reinitialised.
    source = SourceWeights(source_model.state_dict(), None, "torchvision", "src.pth")
    source.state_dict["extra.weight"] = torch.zeros(1)
    target = model(3, seed=2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, source, TARGET_CLASSES)
    reinitialised = dict(report.reinitialised)
    assert set(reinitialised) == {
        "roi_heads.box_head.cls_score.weight",
        "roi_heads.box_head.cls_score.bias",
        "roi_heads.box_head.bbox_pred.weight",
        "roi_heads.box_head.bbox_pred.bias",
        "roi_heads.mask_head.predictor.weight",
        "roi_heads.mask_head.predictor.bias",
    }
    assert "(6,) in source, (4,) here" in reinitialised["roi_heads.box_head.cls_score.bias"]
    assert torch.equal(
        target.state_dict()["roi_heads.box_head.cls_score.weight"],
        fresh["roi_heads.box_head.cls_score.weight"],
    )
    assert report.unused == ["extra.weight"]

    # A narrower FPN: its tensors are reported, the backbone still loads.
    narrow = model(3, seed=3, fpn_channels=16)
    source = SourceWeights(narrow.state_dict(), TARGET_CLASSES, "trainer", "narrow")
    report = transfer_weights(model(3, seed=4), source, TARGET_CLASSES)
    assert any(k.startswith("fpn.") for k, _ in report.reinitialised)
    assert any(k.startswith("backbone.") for k in report.loaded)


def test_same_class_list_copies_placeholder_rows_too():
    classes = ["person", "N/A", "car"]
    source = SourceWeights(model(3, seed=1).state_dict(), classes, "torchvision", "tv")
    target = model(3, seed=2)
    transfer_weights(target, source, classes)
    out = target.state_dict()
    assert all(torch.equal(out[k], source.state_dict[k]) for k in out)


def test_at_iteration_0_the_shared_classes_are_detected_as_by_the_source():
    """A model for [circle, square, triangle] initialised from one for [square, circle]: with
    the new class silenced, it returns exactly the source model's detections, relabelled."""
    source_model = model(2, seed=1).eval()
    source_classes = ["square", "circle"]
    source = SourceWeights(source_model.state_dict(), source_classes, "trainer", "src")
    target = model(3, seed=2).eval()
    transfer_weights(target, source, ["circle", "square", "triangle"])
    with torch.no_grad():
        target.roi_heads.box_head.cls_score.bias[3] = -1e4  # triangle never wins
        # Make the random source model confident enough to detect something.
        for m in (source_model, target):
            m.roi_heads.score_thresh = 0.0
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        expected = source_model(images)[0]
        got = target(images)[0]
    assert len(expected["labels"]) > 0
    relabel = torch.tensor([0, 2, 1])  # source label -> target label
    expected["labels"] = relabel[expected["labels"]]

    def in_order(result):  # ties in score may come out in either order
        keys = torch.cat([result["scores"][:, None], result["labels"][:, None], result["boxes"]], 1)
        order = sorted(range(len(keys)), key=lambda i: keys[i].tolist())
        return {k: v[order] for k, v in result.items()}

    got, expected = in_order(got), in_order(expected)
    assert torch.equal(got["labels"], expected["labels"])
    torch.testing.assert_close(got["boxes"], expected["boxes"])
    torch.testing.assert_close(got["scores"], expected["scores"])
    assert torch.equal(got["masks"], expected["masks"])
