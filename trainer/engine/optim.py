"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from trainer.registry import Registry

OPTIMIZERS = Registry("optimizer", {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW})


def scaled_lr(base_lr: float, base_batch_size: int, global_batch_size: int) -> float:
    """Linear scaling rule: the recipe's lr is for ``base_batch_size`` images per step."""
    return base_lr * global_batch_size / base_batch_size


def build_optimizer(model: nn.Module, cfg: DictConfig, global_batch_size: int):
    """``optimizer`` section -> torch optimizer over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(cfg.lr, cfg.base_batch_size, global_batch_size)
    cls = OPTIMIZERS.get(cfg.type)
    if cls is torch.optim.SGD:
        return cls(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(
    iteration: int,
    iters_per_epoch: int,
    warmup_iters: int,
    warmup_ratio: float,
    steps: list[int],
    gamma: float,
) -> float:
    """Multiplier of the base lr at an iteration: linear warmup from ``warmup_ratio``,
    then ``gamma`` applied once for each epoch boundary in ``steps`` already passed."""
    factor = gamma ** sum(iteration >= step * iters_per_epoch for step in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_ratio * (1 - alpha) + alpha
    return factor


def build_lr_scheduler(
    optimizer, cfg: DictConfig, iters_per_epoch: int, start_iter: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_schedule`` section -> per-iteration LambdaLR, positioned at ``start_iter``.

    It is a pure function of the iteration, so resuming only needs the iteration count.
    """
    steps = list(cfg.steps)

    def factor(iteration: int) -> float:
        return lr_factor(
            iteration, iters_per_epoch, cfg.warmup_iters, cfg.warmup_ratio, steps, cfg.gamma
        )

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_iter - 1)
