"""model.channels_last and model.inference_precision: what they change and what they keep."""

import pytest
import torch

import trainer.models.mask_rcnn as mask_rcnn
from tests.models.conftest import small_model_config
from trainer.config import RecipeError, load_recipe
from trainer.models import build_detector
from trainer.models.heads import BoxHead, MaskHead, RPNHead


def detector(**options):
    cfg = small_model_config()
    for key, value in options.items():
        cfg[key] = value
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3).eval()
    with torch.no_grad():  # a few classes well above the score threshold: ~100 detections
        model.roi_heads.box_head.cls_score.bias[1:] = 4.0
    return model


def images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 64, generator=g)]


def test_mask_head_logits_are_the_same_from_either_layout():
    torch.manual_seed(0)
    head = MaskHead(8, 16, 2, 5)
    pooled = torch.randn(6, 8, 14, 14)
    labels = torch.tensor([1, 5, 2, 2, 3, 4])
    with torch.no_grad():
        expected = head(pooled, labels)
        got = head(pooled.contiguous(memory_format=torch.channels_last), labels)
        none = head(pooled[:0], labels[:0])
    assert expected.shape == (6, 28, 28) and none.shape == (0, 28, 28)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_channels_last_gives_the_same_detections():
    nchw = detector(channels_last=False, inference_precision="fp32")
    nhwc = detector(channels_last=True, inference_precision="fp32")
    assert detector().channels_last is None  # null: channels-last on the CPU
    with torch.no_grad():
        batch, _ = nhwc.preprocess(images())
        assert batch.is_contiguous(memory_format=torch.channels_last)
        expected, got = nchw(images()), nhwc(images())
    for exp, out in zip(expected, got):
        assert len(exp["boxes"]) > 10 and len(out["boxes"]) == len(exp["boxes"])
        torch.testing.assert_close(out["boxes"], exp["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-5, rtol=0)
        assert torch.equal(out["labels"], exp["labels"])
        assert (out["masks"] != exp["masks"]).float().mean() < 1e-3


def test_bf16_inference_keeps_fp32_outputs_and_training_untouched():
    model = detector(inference_precision="bf16")
    with torch.no_grad():
        outputs = model(images())
    for output in outputs:
        assert len(output["boxes"]) > 0
        assert output["boxes"].dtype == output["scores"].dtype == torch.float32
        assert output["masks"].dtype == torch.bool
    # Training is left to the training loop's mixed precision: no autocast of the model's own.
    model.train()
    seen = []
    hook = model.backbone.register_forward_hook(
        lambda module, args, out: seen.append(torch.is_autocast_enabled("cpu"))
    )
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 96, 128, dtype=torch.uint8),
    }
    model([images()[0]], [target])
    model.eval()
    with torch.no_grad():
        model(images())
    hook.remove()
    assert seen == [False, True]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_on_cpus_with_native_bf16_only(monkeypatch, native):
    monkeypatch.setattr(mask_rcnn, "cpu_has_native_bf16", lambda: native)
    assert mask_rcnn.inference_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert mask_rcnn.inference_dtype("auto", "cuda") == torch.float32  # not measured on GPUs
    assert mask_rcnn.inference_dtype("fp32", "cpu") == torch.float32
    assert mask_rcnn.inference_dtype("bf16", "cuda") == torch.bfloat16
    model = detector()
    assert model.inference_precision == "auto"  # the recipe's default
    seen = []
    model.backbone.register_forward_hook(
        lambda module, args, out: seen.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        )
    )
    with torch.no_grad():
        bf16 = model(images())
    assert seen == [torch.bfloat16 if native else None]
    with torch.no_grad():
        fp32 = detector(inference_precision="fp32")(images())
    for got, expected in zip(bf16, fp32):  # bf16 or not, the detections hold
        assert len(got["boxes"]) == len(expected["boxes"]) > 10
        gap = (expected["boxes"][:, None] - got["boxes"][None]).abs().amax(-1)
        assert (gap.amin(1) < 1.0).float().mean() > (0.9 if native else 0.999)


def test_inference_precision_is_checked():
    with pytest.raises(RecipeError, match="inference_precision"):
        load_recipe("recipes/demo.yaml", ["model.inference_precision=int8"])
    with pytest.raises(ValueError, match="inference_precision"):
        detector(inference_precision="fp64")


def test_bf16_inference_ranks_by_fp32_scores_and_deltas():
    """Under bf16 inference the layers whose outputs rank proposals and detections run in
    fp32 (8 mantissa bits would tie near-equal scores); training keeps the loop's autocast."""
    torch.manual_seed(0)
    rpn, box = RPNHead(8, 3), BoxHead(8, 7, 16, 5)
    features, pooled = [torch.randn(1, 8, 6, 6)], torch.randn(4, 8, 7, 7)
    with torch.no_grad():
        expected_logits, _ = rpn.eval()(features)
        expected_scores, expected_deltas = box.eval()(pooled)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, deltas = rpn(features)
            scores, box_deltas = box(pooled)
            box.train()
            train_scores, _ = box(pooled)
    assert logits[0].dtype == deltas[0].dtype == torch.float32
    assert scores.dtype == box_deltas.dtype == torch.float32
    assert train_scores.dtype == torch.bfloat16
    # Only the hidden features were rounded: the scores stay near fp32's.
    torch.testing.assert_close(scores, expected_scores, atol=0.05, rtol=0.05)
    torch.testing.assert_close(logits[0], expected_logits[0], atol=0.05, rtol=0.05)
    torch.testing.assert_close(box_deltas, expected_deltas, atol=0.05, rtol=0.05)


def test_keeping_scores_makes_masks_only_for_kept_detections():
    model = detector(inference_precision="fp32")
    with torch.no_grad():
        model.roi_heads.box_head.cls_score.bias[2:] = 0.0  # a spread of scores around 0.5
        everything = model(images())
        threshold = everything[0]["scores"].median().item()  # a score that exists: kept
        masked = []
        hook = model.roi_heads.mask_head.register_forward_hook(
            lambda module, args, out: masked.append(len(args[0]))
        )
        with model.keeping_scores(threshold):
            kept = model(images())
        hook.remove()
    assert model.roi_heads.score_thresh == small_model_config().roi_heads.score_thresh
    total = sum(len(output["scores"]) for output in everything)
    assert 0 < sum(masked) < total
    for full, got in zip(everything, kept):
        keep = full["scores"] >= threshold
        assert keep.any() and not keep.all()
        assert sum(masked) >= len(got["scores"])
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(got[key], full[key][keep]), key
