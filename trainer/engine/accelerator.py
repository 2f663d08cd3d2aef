"""The Accelerator of a training run, built from the recipe."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs
from omegaconf import DictConfig


def build_accelerator(cfg: DictConfig) -> Accelerator:
    """Accelerator with the recipe's mixed precision (null: the accelerate config's),
    gradient accumulation, trackers and DDP options (``ddp.*``).

    On a machine without a GPU (or other accelerator) it is created with ``cpu=True``: that
    is what makes ``accelerate launch --multi_gpu --num_processes 2`` start two processes
    that train together over gloo; without it each process silently trains alone. Shuffled
    loaders get Accelerate's seedable sampler, whose order is a function of seed and epoch.
    """
    return Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optimizer.accumulation_steps,
        log_with=list(cfg.trackers) or None,
        project_dir=cfg.work_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp.find_unused_parameters)
        ],
    )


def build_inference_accelerator(cfg: DictConfig) -> Accelerator:
    """Accelerator for evaluation and prediction: device placement, the recipe's mixed
    precision, and (under ``accelerate launch``) the processes sharing the work; ``cpu=True``
    without an accelerator, for the same reason as in :func:`build_accelerator`."""
    return Accelerator(
        cpu=not torch.accelerator.is_available(), mixed_precision=cfg.mixed_precision
    )
