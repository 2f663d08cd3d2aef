"""Optimizer with parameter groups, and the per-update learning-rate schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from trainer.config import RecipeError
from trainer.registry import Registry

OPTIMIZERS = Registry("optimizer", {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW})
POLICIES = ("step", "cosine")


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
    """``optimizer`` section -> SGD or AdamW over :func:`param_groups`, at the lr scaled to
    ``global_batch_size`` (processes x images per process x accumulation steps)."""
    cls = OPTIMIZERS.get(cfg.type)
    lr = scaled_lr(cfg.lr, cfg.base_batch_size, global_batch_size)
    groups = param_groups(
        model, lr, cfg.weight_decay, cfg.backbone_lr_mult, cfg.decay_norm_and_bias
    )
    if not groups:
        raise RecipeError("the model has no trainable parameters (is every stage frozen?).")
    if cls is torch.optim.SGD:
        return cls(groups, lr=lr, momentum=cfg.momentum)
    return cls(groups, lr=lr, betas=tuple(cfg.betas))


def lr_factor(
    iteration: int,
    iters_per_epoch: int,
    warmup_iters: int,
    warmup_ratio: float,
    steps: list[int],
    gamma: float,
    policy: str = "step",
    total_iters: int | None = None,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak lr at update ``iteration`` (0-based).

    Linear warmup from ``warmup_ratio`` to 1 over ``warmup_iters``, times the decay:
    "step" multiplies by ``gamma`` once for each epoch in ``steps`` already reached; "cosine"
    anneals from 1 at update 0 to ``min_lr_ratio`` at ``total_iters``.
    """
    if policy == "step":
        factor = gamma ** sum(iteration >= step * iters_per_epoch for step in steps)
    else:
        progress = min(iteration / max(total_iters, 1), 1.0)
        factor = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_ratio * (1 - alpha) + alpha
    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: DictConfig,
    iters_per_epoch: int,
    total_iters: int,
    start_iter: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_schedule`` section -> LambdaLR stepped once per update, positioned at ``start_iter``.

    The lr is a pure function of the update count, so resuming needs only that count; each
    group's ``initial_lr`` (set by :func:`param_groups`) is its peak.
    """
    if cfg.policy not in POLICIES:
        raise RecipeError(
            f"lr_schedule.policy must be one of {list(POLICIES)}, got {cfg.policy!r}."
        )
    steps = list(cfg.steps)

    def factor(iteration: int) -> float:
        return lr_factor(
            iteration,
            iters_per_epoch,
            cfg.warmup_iters,
            cfg.warmup_ratio,
            steps,
            cfg.gamma,
            cfg.policy,
            total_iters,
            cfg.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_iter - 1)
