import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from trainer.config import LRScheduleConfig, OptimizerConfig, Recipe, RecipeError
from trainer.engine.optim import (
    OPTIMIZERS,
    CosineSchedule,
    StepSchedule,
    build_lr_scheduler,
    build_optimizer,
    warmup_factor,
)


class TwoPartModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)


def optimizer_cfg(**kwargs):
    return OmegaConf.structured(OptimizerConfig(**kwargs))


def test_lr_scales_linearly_with_global_batch():
    model = torch.nn.Linear(2, 2)
    cfg = optimizer_cfg(lr=0.02, base_batch_size=16)
    assert build_optimizer(model, cfg, 16).param_groups[0]["lr"] == pytest.approx(0.02)
    assert build_optimizer(model, cfg, 4).param_groups[0]["lr"] == pytest.approx(0.005)


def test_norms_and_biases_get_no_decay_and_the_backbone_its_lr_multiplier():
    model = TwoPartModel()
    cfg = optimizer_cfg(lr=0.02, base_batch_size=16, weight_decay=1e-4, backbone_lr_mult=0.1)
    optimizer = build_optimizer(model, cfg, 16)
    groups = {g["name"]: g for g in optimizer.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    bn = model.backbone[1]
    assert ids["backbone.decay"] == {id(model.backbone[0].weight)}
    assert ids["backbone.no_decay"] == {id(bn.weight), id(bn.bias)}
    assert ids["head.decay"] == {id(model.head.weight)}
    assert ids["head.no_decay"] == {id(model.head.bias)}
    assert groups["backbone.decay"]["lr"] == pytest.approx(0.002)
    assert groups["head.no_decay"]["lr"] == pytest.approx(0.02)
    assert groups["head.decay"]["weight_decay"] == 1e-4
    assert groups["backbone.no_decay"]["weight_decay"] == 0.0
    assert optimizer.defaults["momentum"] == 0.9


def test_decay_everywhere_when_asked_and_frozen_parameters_left_out():
    model = TwoPartModel()
    model.backbone[0].weight.requires_grad_(False)
    cfg = optimizer_cfg(decay_norm_and_bias=True, weight_decay=1e-4)
    optimizer = build_optimizer(model, cfg, 16)
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


def test_adamw_takes_its_betas_and_unknown_types_are_recipe_errors():
    cfg = optimizer_cfg(type="AdamW", betas=[0.8, 0.9])
    optimizer = build_optimizer(TwoPartModel(), cfg, 16)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(RecipeError, match="unknown optimizer type 'Adam'"):
        build_optimizer(TwoPartModel(), optimizer_cfg(type="Adam"), 16)


def test_warmup_then_steps():
    schedule = StepSchedule([800, 1100], gamma=0.1)

    def lr_factor(iteration):
        return warmup_factor(iteration, 500, 0.001) * schedule.factor(iteration)

    assert lr_factor(0) == pytest.approx(0.001)
    assert lr_factor(250) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(500) == 1.0
    assert lr_factor(799) == 1.0
    assert lr_factor(800) == pytest.approx(0.1)
    assert lr_factor(1100) == pytest.approx(0.01)


def test_cosine_decays_to_the_minimum_after_warmup():
    schedule = CosineSchedule(total_iters=1000, min_lr_ratio=0.05)

    def lr_factor(iteration):
        return warmup_factor(iteration, 10, 0.1) * schedule.factor(iteration)

    cosine = lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / 1000))  # noqa: E731
    assert lr_factor(0) == pytest.approx(0.1)
    assert lr_factor(5) == pytest.approx(cosine(5) * (0.1 * 0.5 + 0.5))
    assert lr_factor(500) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(1000) == pytest.approx(0.05)
    assert lr_factor(1200) == pytest.approx(0.05)


def test_scheduler_resumes_at_an_iteration():
    def build(start_iter):
        model = torch.nn.Linear(2, 2)
        cfg = OmegaConf.structured(OptimizerConfig(lr=1.0, base_batch_size=1))
        optimizer = build_optimizer(model, cfg, 1)
        schedule = OmegaConf.structured(LRScheduleConfig(warmup_iters=10, steps=[1]))
        return optimizer, build_lr_scheduler(optimizer, schedule, 20, 40, start_iter=start_iter)

    optimizer, scheduler = build(0)
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    resumed, _ = build(15)
    assert resumed.param_groups[0]["lr"] == pytest.approx(lrs[15])
    assert lrs[19] == 1.0 and lrs[20] == pytest.approx(0.1)


def test_unknown_schedule_policy_is_a_recipe_error():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    cfg = OmegaConf.structured(Recipe).lr_schedule  # its place in a recipe
    cfg.policy = "poly"
    with pytest.raises(RecipeError, match="lr_schedule.policy"):
        build_lr_scheduler(optimizer, cfg, 10, 100)


def test_an_optimizer_of_ones_own_needs_one_registration(monkeypatch):
    monkeypatch.setattr(OPTIMIZERS, "entries", dict(OPTIMIZERS.entries))
    monkeypatch.setattr(OPTIMIZERS, "from_configs", dict(OPTIMIZERS.from_configs))

    @OPTIMIZERS.register
    class PlainSGD(torch.optim.SGD):
        @classmethod
        def from_config(cls, cfg, params, lr):
            return cls(params, lr=lr)

    # A class we do not own comes with its from_config function.
    OPTIMIZERS.register(
        torch.optim.RMSprop,
        from_config=lambda cfg, params, lr: torch.optim.RMSprop(params, lr, momentum=cfg.momentum),
    )
    plain = build_optimizer(TwoPartModel(), optimizer_cfg(type="PlainSGD"), 8)
    assert type(plain) is PlainSGD and plain.defaults["momentum"] == 0
    assert plain.param_groups[0]["lr"] == pytest.approx(0.01)
    rmsprop = build_optimizer(TwoPartModel(), optimizer_cfg(type="RMSprop", momentum=0.5), 16)
    assert type(rmsprop) is torch.optim.RMSprop and rmsprop.defaults["momentum"] == 0.5
