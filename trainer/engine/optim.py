"""Optimizer with parameter groups, and the per-update learning-rate schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from trainer.registry import Registry, build


def sgd_from_config(cfg: DictConfig, params: list[dict], lr: float) -> torch.optim.SGD:
    """``optimizer`` node -> SGD over the param groups ``params`` at ``lr``."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)


def adamw_from_config(cfg: DictConfig, params: list[dict], lr: float) -> torch.optim.AdamW:
    """``optimizer`` node -> AdamW over the param groups ``params`` at ``lr``."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas))


OPTIMIZERS = Registry("optimizer")
OPTIMIZERS.register(torch.optim.SGD, from_config=sgd_from_config)
OPTIMIZERS.register(torch.optim.AdamW, from_config=adamw_from_config)


def scaled_lr(base_lr: float, base_batch_size: int, global_batch_size: int) -> float:
    """Linear scaling rule: the recipe's lr is for ``base_batch_size`` images per update."""
    return base_lr * global_batch_size / base_batch_size


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # timm's rule (timm.optim.param_groups_weight_decay): biases and every 1-d parameter, which
    # in these models are exactly the normalization layers' weights and biases.
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    decay_norm_and_bias: bool = False,
) -> list[dict]:
    """Trainable parameters split by (backbone or not) x (decayed or not).

    Returns torch param groups with ``params``, ``lr``, ``weight_decay``, ``initial_lr`` (the
    schedule's peak) and ``name`` (e.g. "backbone.no_decay"); empty groups are left out.
    Parameters under ``model.backbone`` get ``lr * backbone_lr_mult``.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.startswith("backbone.")
        decay = decay_norm_and_bias or not _is_no_decay(name, param)
        groups.setdefault((in_backbone, decay), []).append(param)
    result = []
    for (in_backbone, decay), params in sorted(groups.items()):
        group_lr = lr * (backbone_lr_mult if in_backbone else 1.0)
        part = "backbone" if in_backbone else "head"
        result.append(
            {
                "params": params,
                "name": f"{part}.{'decay' if decay else 'no_decay'}",
                "lr": group_lr,
                "initial_lr": group_lr,
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    return result


def build_optimizer(model: nn.Module, cfg: DictConfig, global_batch_size: int):
    """``optimizer`` section -> the optimizer its ``type`` names over :func:`param_groups`, at
    the lr scaled to ``global_batch_size`` (processes x images per process x accumulation
    steps)."""
    lr = scaled_lr(cfg.lr, cfg.base_batch_size, global_batch_size)
    groups = param_groups(
        model, lr, cfg.weight_decay, cfg.backbone_lr_mult, cfg.decay_norm_and_bias
    )
    if not groups:
        raise ValueError("the model has no trainable parameters (is every stage frozen?).")
    return build(OPTIMIZERS, cfg, params=groups, lr=lr)


class StepSchedule:
    """Multiplies the lr by ``gamma`` once for each update of ``milestones`` reached."""

    def __init__(self, milestones: list[int], gamma: float):
        self.milestones, self.gamma = milestones, gamma

    @classmethod
    def from_config(cls, cfg: DictConfig, iters_per_epoch: int, total_iters: int):
        """``lr_schedule`` node (``steps`` in epochs, ``gamma``) -> schedule."""
        return cls([step * iters_per_epoch for step in cfg.steps], cfg.gamma)

    def factor(self, iteration: int) -> float:
        return self.gamma ** sum(iteration >= milestone for milestone in self.milestones)


class CosineSchedule:
    """Anneals the lr factor from 1 at update 0 to ``min_lr_ratio`` at ``total_iters``."""

    def __init__(self, total_iters: int, min_lr_ratio: float = 0.0):
        self.total_iters, self.min_lr_ratio = total_iters, min_lr_ratio

    @classmethod
    def from_config(cls, cfg: DictConfig, iters_per_epoch: int, total_iters: int):
        """``lr_schedule`` node (``min_lr_ratio``) -> schedule over ``total_iters``."""
        return cls(total_iters, cfg.min_lr_ratio)

    def factor(self, iteration: int) -> float:
        progress = min(iteration / max(self.total_iters, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


# lr_schedule.policy -> schedule class.
SCHEDULES = Registry("lr schedule", {"step": StepSchedule, "cosine": CosineSchedule})


def warmup_factor(iteration: int, warmup_iters: int, warmup_ratio: float) -> float:
    """Linear from ``warmup_ratio`` at update 0 to 1 at ``warmup_iters``, then 1."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return warmup_ratio * (1 - alpha) + alpha


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: DictConfig,
    iters_per_epoch: int,
    total_iters: int,
    start_iter: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_schedule`` section -> LambdaLR stepped once per update, positioned at ``start_iter``:
    the peak lr times :func:`warmup_factor` times the factor of the schedule ``policy`` names.

    The lr is a pure function of the update count, so resuming needs only that count; each
    group's ``initial_lr`` (set by :func:`param_groups`) is its peak.
    """
    schedule = build(
        SCHEDULES,
        cfg,
        type_key="policy",
        iters_per_epoch=iters_per_epoch,
        total_iters=total_iters,
    )
    warmup_iters, warmup_ratio = cfg.warmup_iters, cfg.warmup_ratio

    # A function, not a callable object: LambdaLR saves an object's attributes with its
    # state and would restore them over a recipe changed on resume.
    def factor(iteration: int) -> float:
        return warmup_factor(iteration, warmup_iters, warmup_ratio) * schedule.factor(iteration)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_iter - 1)
