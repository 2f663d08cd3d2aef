"""The Accelerator of a training run, built from the recipe."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
)
from omegaconf import DictConfig


def build_accelerator(cfg: DictConfig) -> Accelerator:
    """Accelerator with the recipe's mixed precision (null: the accelerate config's),
    gradient accumulation, trackers, DDP options (``ddp.*``) and ``dist_timeout``.

    On a machine without a GPU (or other accelerator) it is created with ``cpu=True``: that
    is what makes ``accelerate launch --multi_gpu --num_processes 2`` start two processes
    that train together over gloo; without it each process silently trains alone. Shuffled
    loaders get Accelerate's seedable sampler, whose order is a function of seed and epoch.
    """
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    join_restarted_group(timeout)
    return Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optimizer.accumulation_steps,
        log_with=list(cfg.trackers) or None,
        project_dir=cfg.work_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp.find_unused_parameters),
            InitProcessGroupKwargs(timeout=timeout),
        ],
    )


def join_restarted_group(timeout: datetime.timedelta) -> None:
    """Start the process group of a group restarted by torchrun's elastic agent
    (``accelerate launch --max_restarts N``), under a key prefix of its own.

    The agent serves one store for all restarts, and the previous attempt's connection keys
    are still in it: a plain ``init_process_group`` reads them and gloo fails to connect to
    ports of processes that are gone (NCCL would read a stale unique id). Accelerate then
    uses the group as it finds it.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    if dist.is_initialized():
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"restart_{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def build_inference_accelerator(cfg: DictConfig) -> Accelerator:
    """Accelerator for evaluation and prediction: device placement, the recipe's mixed
    precision, and (under ``accelerate launch``) the processes sharing the work; ``cpu=True``
    without an accelerator, for the same reason as in :func:`build_accelerator`."""
    return Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        ],
    )
