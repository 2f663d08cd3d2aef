"""``train_detector``: a training run as a sequence of named steps.

    initialise_from(model, load_from, ...)                  # fine-tuning: trained weights
    loaders   = build_loaders(datasets, ...)                # seeded samples, one orientation
    optimizer = build_optimizer(model, ...)                 # lr scaled to the global batch
    model, optimizer, loaders = prepare(accelerator, ...)   # devices, DDP / FSDP, shards
    state     = restore(accelerator, optimizer, ...)        # resume=auto or a folder
    scheduler = build_lr_scheduler(..., start_iter=state.iter)
    Runner(TrainingParts(...), LoopSettings.from_recipe(cfg), state).run()   # runner.py

Each step takes plain values; only ``train_detector`` reads the recipe. The forward, backward
and optimizer step are in :meth:`Runner.train_epoch` and :meth:`Runner._optimizer_step`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler, get_sampler
from omegaconf import DictConfig
from timm.utils import ModelEmaV3
from torch.utils.data import RandomSampler

from trainer.config import RecipeError, to_dict
from trainer.data import build_dataloader
from trainer.engine import collective_timeout
from trainer.engine.accelerator import build_accelerator
from trainer.engine.checkpoint import (
    STATE_FILE,
    CheckpointError,
    checkpoint_problem,
    checkpoints_dir,
    estimate_checkpoint_size,
    find_latest,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
)
from trainer.engine.logging import flatten, get_logger
from trainer.engine.optim import build_lr_scheduler, build_optimizer
from trainer.engine.runner import LoopSettings, Runner, TrainingParts
from trainer.engine.state import TrainState
from trainer.engine.trackers import start_trackers
from trainer.engine.work_dir_lock import (
    check_work_dir_space,
    hold_work_dir,
    log_lock_notices,
    note_fresh_start,
)
from trainer.evaluation.coco import CocoEvaluator
from trainer.seeding import SeededSamples
from trainer.weights.classes import ModelClasses
from trainer.weights.transfer import TransferReport, transfer_weights


def train_detector(
    model: torch.nn.Module,
    datasets: dict,
    cfg: DictConfig,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Train ``model`` on ``datasets["train"]`` following ``cfg.workflow``.

    ``datasets`` maps "train" (and "val" when the workflow has a val phase or
    ``val_interval_iters`` is set) to datasets. ``accelerator`` defaults to
    :func:`build_accelerator`. Returns the metrics of the last val phase.

    The main process holds ``cfg.work_dir`` for the run: a second run on it stops at once.
    """
    accelerator = accelerator or build_accelerator(cfg)
    with hold_work_dir(accelerator, cfg.work_dir):
        return _train_detector(model, datasets, cfg, accelerator)


def _train_detector(
    model: torch.nn.Module, datasets: dict, cfg: DictConfig, accelerator: Accelerator
) -> dict[str, float]:
    """:func:`train_detector` with the work_dir held."""
    log_lock_notices(cfg.work_dir)  # when the caller had no logger yet to take them
    if accelerator.is_main_process:
        remove_partial_checkpoints(cfg.work_dir)  # a save killed mid-way: finished or undone
    # Optimizer tensors per trainable parameter: SGD's momentum buffer, AdamW's two moments.
    states = (1 if cfg.optimizer.momentum else 0) if cfg.optimizer.type == "SGD" else 2
    size = estimate_checkpoint_size(model, states, cfg.ema.enabled)
    check_work_dir_space(accelerator, cfg.work_dir, size, cfg.checkpoint.keep_last)
    check_sync_bn(model, accelerator)
    check_same_classes(datasets)
    resume = resume_setting(cfg.resume)
    if cfg.load_from is not None:
        if will_resume(resume, cfg.work_dir):
            get_logger().info("load_from %s skipped: the run resumes", cfg.load_from)
        else:
            initialise_from(model, cfg.load_from, list(datasets["train"].CLASSES), accelerator)
    data = cfg.data
    loaders = build_loaders(
        datasets, data.imgs_per_gpu, data.workers_per_gpu, cfg.seed, data.group_by_aspect_ratio
    )
    if len(loaders["train"]) == 0:
        raise RecipeError(f"the training set '{data.train.ann_file}' has no usable images.")
    steps = accelerator.gradient_accumulation_steps
    global_batch = data.imgs_per_gpu * accelerator.num_processes * steps
    optimizer = build_optimizer(model, cfg.optimizer, global_batch)
    log_optimizer(optimizer, accelerator.num_processes, data.imgs_per_gpu, steps, cfg.optimizer)
    if cfg.compile:
        compile_backbone(model)

    model, optimizer, loaders = prepare(accelerator, model, optimizer, loaders)
    ema = None
    if cfg.ema.enabled:
        unwrapped = accelerator.unwrap_model(model)
        ema = ModelEmaV3(unwrapped, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
    state = restore(accelerator, optimizer, ema, resume, cfg.work_dir)
    iters_per_epoch = math.ceil(len(loaders["train"]) / steps)
    # Not passed to prepare(): Accelerate would step it once per process per update, and the
    # schedule counts this run's updates already.
    scheduler = build_lr_scheduler(
        optimizer,
        cfg.lr_schedule,
        iters_per_epoch,
        total_iters=cfg.total_epochs * iters_per_epoch,
        start_iter=state.iter,
    )
    evaluator = None
    if "val" in datasets:
        evaluator = CocoEvaluator.for_dataset(datasets["val"], accelerator, cfg.evaluation.backend)
    parts = TrainingParts(accelerator, model, optimizer, scheduler, loaders, evaluator, ema)
    settings = LoopSettings.from_recipe(cfg, ModelClasses.of_dataset(datasets["train"]))

    start_trackers(
        accelerator, list(cfg.trackers), cfg.project, flatten(to_dict(cfg)), cfg.work_dir
    )
    runner = Runner(parts, settings, state)
    try:
        return runner.run()
    except Exception as exc:
        if accelerator.num_processes > 1 and collective_timeout.is_collective_failure(exc):
            latest = latest_checkpoint(cfg.work_dir)
            raise collective_timeout.explain(
                exc,
                accelerator.process_index,
                cfg.dist_timeout,
                runner.state.iter,
                latest.name if latest else None,
            ) from exc
        raise
    finally:
        accelerator.end_training()  # finishes the trackers


def check_sync_bn(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """torch's SyncBatchNorm needs GPUs: stop before training rather than at the first step."""
    synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if synced and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        raise RecipeError(
            f"model.backbone.sync_bn: torch's SyncBatchNorm runs on GPUs only, and these "
            f"{accelerator.num_processes} processes run on the CPU; set "
            "model.backbone.sync_bn: false."
        )


def check_same_classes(datasets: dict) -> None:
    """The val set must name the training set's classes in the same order: its labels index
    the same rows of the heads. Stop before training rather than at the first val phase."""
    if "val" not in datasets:
        return
    train, val = (ModelClasses.of_dataset(datasets[split]) for split in ("train", "val"))
    if (train.names, train.category_ids) != (val.names, val.category_ids):
        raise RecipeError(
            "the val set's categories differ from the training set's: train "
            f"{dict(zip(train.label_to_cat.values(), train.names))}, val "
            f"{dict(zip(val.label_to_cat.values(), val.names))} (id: name). Give both "
            "annotation files the same categories, with the same ids."
        )


def resume_setting(resume: str | None) -> str | None:
    """The recipe's ``resume``, except in a process group restarted by torchrun's elastic
    agent (``accelerate launch --max_restarts N``): that one continues from the latest
    checkpoint, as ``resume=auto``."""
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        get_logger().info(
            "restart %s of the process group: resume=auto", os.environ["TORCHELASTIC_RESTART_COUNT"]
        )
        return "auto"
    return resume


def will_resume(resume: str | None, work_dir: str) -> bool:
    """Whether :func:`restore` will load a checkpoint (with resume=auto: the newest complete)."""
    return resume is not None and (resume != "auto" or latest_checkpoint(work_dir) is not None)


def initialise_from(
    model: torch.nn.Module, source: str, class_names: list[str], accelerator: Accelerator
) -> TransferReport:
    """Load trained detector weights (any format of ``trainer.weights.read``) into ``model``,
    class rows matched by name, and log what was transferred. The main process downloads
    first, the others then read its copy."""
    # Imported here: the readers use engine.checkpoint, which imports this package.
    from trainer.weights.read import read_weights

    try:
        with accelerator.main_process_first():
            weights = read_weights(source)
        report = transfer_weights(model, weights, class_names)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"load_from {source}: {exc}") from None
    if not report.loaded:
        raise CheckpointError(
            f"load_from {source}: no tensor of it fits this model ({report.format} format; "
            f"{len(report.reinitialised)} differ in shape, {len(report.missing)} missing): "
            "is the recipe's model the one the weights were trained with?"
        )
    get_logger().info("%s", report.table())
    return report


def build_loaders(
    datasets: dict,
    imgs_per_gpu: int,
    workers_per_gpu: int,
    seed: int,
    group_by_aspect_ratio: bool = True,
) -> dict:
    """{"train": shuffled loader (batches of one orientation with ``group_by_aspect_ratio``),
    "val": loader in file order (when a val set is given)}.

    ``imgs_per_gpu`` images per batch of each process (its DataLoader's batch size). Both
    datasets are wrapped in :class:`SeededSamples`: the training augmentations are then a
    function of (seed, epoch, index), and val loading never draws from the random stream of
    the losses.
    """
    loaders = {
        "train": build_dataloader(
            SeededSamples(datasets["train"], seed),
            imgs_per_gpu,
            workers_per_gpu,
            shuffle=True,
            seed=seed,
            group_by_aspect_ratio=group_by_aspect_ratio,
        )
    }
    if "val" in datasets:
        loaders["val"] = build_dataloader(
            SeededSamples(datasets["val"], seed), imgs_per_gpu, workers_per_gpu, shuffle=False
        )
    return loaders


def log_optimizer(
    optimizer: torch.optim.Optimizer,
    processes: int,
    imgs_per_gpu: int,
    steps: int,
    cfg: DictConfig,
) -> None:
    """The global batch, the lr it gets from the linear scaling rule, and each param group."""
    logger = get_logger()
    logger.info(
        "global batch %d (%d processes x %d images x %d accumulation steps): lr %.4g "
        "(recipe lr %.4g at %d images)",
        processes * imgs_per_gpu * steps,
        processes,
        imgs_per_gpu,
        steps,
        optimizer.param_groups[0]["initial_lr"],
        cfg.lr,
        cfg.base_batch_size,
    )
    for group in optimizer.param_groups:
        logger.info(
            "param group %s: %d tensors, lr %.4g, weight decay %g",
            group["name"],
            len(group["params"]),
            group["lr"],
            group["weight_decay"],
        )


def compile_backbone(model: torch.nn.Module) -> None:
    """torch.compile the backbone and FPN in place (dynamic shapes): parameter names and
    checkpoints stay those of the plain model."""
    for name in ("backbone", "fpn"):
        if not isinstance(getattr(model, name, None), torch.nn.Module):
            raise RecipeError(f"compile: true needs a model with a '{name}' module.")
        getattr(model, name).compile(dynamic=True)
    get_logger().info("backbone and FPN compiled with torch.compile (dynamic shapes)")


def prepare(
    accelerator: Accelerator, model: torch.nn.Module, optimizer, loaders: dict
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """Wrap model and optimizer (DDP, FSDP, mixed precision) and shard the loaders."""
    model, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        get_logger().info("DDP: find_unused_parameters=%s", model.find_unused_parameters)
    loaders = {name: accelerator.prepare(loader) for name, loader in loaders.items()}
    sampler = get_sampler(loaders["train"])
    if isinstance(sampler, RandomSampler) and not isinstance(sampler, SeedableRandomSampler):
        get_logger().warning(
            "the training order is not seeded per epoch (use trainer.engine.build_accelerator): "
            "a resumed run will not see the data in the same order"
        )
    return model, optimizer, loaders


def restore(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    ema: ModelEmaV3 | None,
    resume: str | None,
    work_dir: str,
) -> TrainState:
    """The state to start from: fresh, or loaded from ``resume`` ("auto": the checkpoint
    ``latest`` names in ``work_dir``, or the newest complete one when that one is missing or
    incomplete; else a checkpoint folder) into the prepared objects.

    The optimizer keeps this run's hyperparameters (lr, weight decay), not the saved ones, so
    that resuming with another number of processes rescales the lr. A fresh start in a used
    work_dir sets its metrics.jsonl aside (with a warning); a resumed run logs again, in place
    of what was logged after its checkpoint (see :class:`trainer.engine.logging.MetricsLog`).
    """
    logger = get_logger()
    accelerator.wait_for_everyone()
    folder, problem = resume, None
    if resume == "auto":
        folder, problem = find_latest(work_dir)
        if problem is not None:
            instead = (
                f"resuming from {folder}, the newest complete one"
                if folder
                else "no complete checkpoint is left: starting fresh"
            )
            logger.warning("resume=auto: %s; %s", problem, instead)
    elif folder is not None and (Path(folder) / STATE_FILE).is_file():
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint '{folder}' is incomplete: {problem}; resume from another folder "
                "under <work_dir>/checkpoints, or resume=auto (the newest complete one)."
            )
    if folder is None:
        if resume == "auto" and problem is None:
            logger.info("resume=auto: no checkpoint in %s yet, starting fresh", work_dir)
        if accelerator.is_main_process:
            note_fresh_start(work_dir, resume)
        return TrainState()
    hyperparameters = [
        {k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups
    ]
    saved = load_checkpoint(accelerator, folder, ema.module if ema is not None else None)
    for group, values in zip(optimizer.param_groups, hyperparameters, strict=True):
        group.update(values)
    state = TrainState.from_dict(saved)
    saved_processes = saved.get("num_processes", accelerator.num_processes)
    if saved_processes != accelerator.num_processes:
        # Same images seen, counted in this run's per-process batches.
        state.epoch_batches = state.epoch_batches * saved_processes // accelerator.num_processes
    # The saved row count is of this work_dir's metrics.jsonl only.
    if Path(folder).resolve().parent == checkpoints_dir(work_dir).resolve():
        state.resumed_rows = saved.get("metrics_rows")
    logger.info(
        "resumed from %s at epoch %d, iter %d (%d batches into the epoch)",
        folder,
        state.epoch,
        state.iter,
        state.epoch_batches,
    )
    return state
