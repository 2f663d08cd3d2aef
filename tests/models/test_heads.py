import pytest
import torch
from omegaconf import OmegaConf

from tests.models.conftest import box_target, small_model_config
from trainer.config import Recipe, RecipeError
from trainer.models import build_detector
from trainer.models.heads import BoxHead, MaskHead


def test_head_shapes():
    pooled = torch.randn(5, 16, 7, 7)
    logits, deltas = BoxHead(16, 7, 32, num_classes=3, num_convs=2)(pooled)
    assert logits.shape == (5, 4) and deltas.shape == (5, 4, 4)
    masks = MaskHead(16, 8, num_convs=2, num_classes=3)(
        torch.randn(5, 16, 14, 14), torch.tensor([1, 3, 2, 3, 1])
    )
    assert masks.shape == (5, 28, 28)


def test_mask_head_predicts_the_given_class_as_a_full_predictor_would():
    torch.manual_seed(0)
    head = MaskHead(16, 8, num_convs=1, num_classes=3)
    torch.nn.init.normal_(head.predictor.bias)
    pooled, labels = torch.randn(6, 16, 14, 14), torch.tensor([1, 2, 3, 3, 2, 1])
    all_classes = head.predictor(torch.relu(head.upsample(head.convs(pooled))))
    expected = all_classes[torch.arange(6), labels - 1]
    torch.testing.assert_close(head(pooled, labels), expected, rtol=1e-5, atol=1e-6)


def test_group_norm_heads_train():
    cfg = small_model_config()
    cfg.roi_heads.norm = "gn"
    cfg.roi_heads.num_box_convs = 2
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=2).train()
    norms = [m for m in model.roi_heads.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 2 + cfg.roi_heads.num_mask_convs
    # 32 groups where the width allows, fewer for narrow layers (mask convs are 16 wide)
    assert {m.num_groups for m in norms} == {32, 16}
    losses = model([torch.rand(3, 64, 64)], [box_target(64, 64, [[5, 5, 40, 50]], [1])])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(m.weight.grad is not None for m in norms)


def test_unknown_head_norm_is_a_recipe_error_naming_the_node():
    cfg = OmegaConf.structured(Recipe).model  # its place in a recipe: "model"
    cfg.merge_with(small_model_config())
    cfg.roi_heads.norm = "bn"
    with pytest.raises(RecipeError, match=r"model.roi_heads: norm must be one of \['none', 'gn'"):
        build_detector(cfg, num_classes=2)
