"""Training entry: loaders, optimizer, Accelerate preparation, resume, then the runner."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler, get_sampler
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3
from torch.utils.data import RandomSampler

from trainer.config import RecipeError, to_dict
from trainer.data import build_dataloader
from trainer.engine.accelerator import build_accelerator
from trainer.engine.checkpoint import latest_checkpoint, load_checkpoint, remove_partial_checkpoints
from trainer.engine.logging import MetricsLog, Trackers, flatten, get_logger
from trainer.engine.optim import build_lr_scheduler, build_optimizer
from trainer.engine.runner import NonFiniteLossError, Runner, RunnerOptions, TrainState
from trainer.engine.seeding import SeededSamples
from trainer.evaluation.coco import CocoEvaluator


def _check_recipe(cfg: DictConfig, has_val: bool) -> None:
    """Values of the training keys that the schema's types cannot check."""
    positive = {
        "log_interval": cfg.log_interval,
        "max_nonfinite_steps": cfg.max_nonfinite_steps,
        "val_interval_iters": cfg.val_interval_iters,
        "checkpoint.interval_iters": cfg.checkpoint.interval_iters,
        "max_iters": cfg.max_iters,
    }
    for key, value in positive.items():
        if value is not None and value < 1:
            raise RecipeError(f"{key} must be a positive integer (or null), got {value}.")
    if cfg.checkpoint.keep_last < 0 or cfg.log_images < 0:
        raise RecipeError("checkpoint.keep_last and log_images must be >= 0 (0: keep all, none).")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise RecipeError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}.")
    if cfg.val_interval_iters and not has_val:
        raise RecipeError("val_interval_iters is set but no val dataset was built.")


def _resume_folder(cfg: DictConfig):
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(cfg.work_dir)
    return cfg.resume


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
    """
    accelerator = accelerator or build_accelerator(cfg)
    logger = get_logger()
    _check_recipe(cfg, "val" in datasets)
    synced = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if synced and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        raise RecipeError(
            f"model.backbone.sync_bn: torch's SyncBatchNorm runs on GPUs only, and these "
            f"{accelerator.num_processes} processes run on the CPU; set "
            "model.backbone.sync_bn: false."
        )
    data, steps = cfg.data, cfg.optimizer.accumulation_steps
    accelerator.gradient_accumulation_steps = steps
    loaders = {
        "train": build_dataloader(
            SeededSamples(datasets["train"], cfg.seed),
            data.imgs_per_gpu,
            data.workers_per_gpu,
            shuffle=True,
            seed=cfg.seed,
            group_by_aspect_ratio=data.group_by_aspect_ratio,
        )
    }
    if len(loaders["train"]) == 0:
        raise RecipeError(f"the training set '{data.train.ann_file}' has no usable images.")
    evaluator = None
    if "val" in datasets:
        # Seeded too, so that loading never draws from the random stream of the val losses.
        loaders["val"] = build_dataloader(
            SeededSamples(datasets["val"], cfg.seed),
            data.imgs_per_gpu,
            data.workers_per_gpu,
            shuffle=False,
        )
        evaluator = CocoEvaluator(
            datasets["val"].coco,
            datasets["val"].label_to_cat,
            accelerator=accelerator,
            iou_types=datasets["val"].iou_types,
            backend=cfg.evaluation.backend,
        )

    global_batch = data.imgs_per_gpu * accelerator.num_processes * steps
    optimizer = build_optimizer(model, cfg.optimizer, global_batch)
    logger.info(
        "global batch %d (%d processes x %d images x %d accumulation steps): lr %.4g "
        "(recipe lr %.4g at %d images)",
        global_batch,
        accelerator.num_processes,
        data.imgs_per_gpu,
        steps,
        optimizer.param_groups[0]["initial_lr"],
        cfg.optimizer.lr,
        cfg.optimizer.base_batch_size,
    )
    for group in optimizer.param_groups:
        logger.info(
            "param group %s: %d tensors, lr %.4g, weight decay %g",
            group["name"],
            len(group["params"]),
            group["lr"],
            group["weight_decay"],
        )
    # The recipe's hyperparameters, re-applied after a resume (which loads the saved ones), so
    # that resuming with another number of processes rescales the lr.
    hyperparameters = [
        {k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups
    ]
    if cfg.compile:
        for name in ("backbone", "fpn"):
            if not isinstance(getattr(model, name, None), torch.nn.Module):
                raise RecipeError(f"compile: true needs a model with a '{name}' module.")
            # In place: parameter names and checkpoints stay those of the plain model.
            getattr(model, name).compile(dynamic=True)
        logger.info("backbone and FPN compiled with torch.compile (dynamic shapes)")
    model, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        logger.info("DDP: find_unused_parameters=%s", model.find_unused_parameters)
    loaders = {name: accelerator.prepare(loader) for name, loader in loaders.items()}
    sampler = get_sampler(loaders["train"])
    if isinstance(sampler, RandomSampler) and not isinstance(sampler, SeedableRandomSampler):
        logger.warning(
            "the training order is not seeded per epoch (use trainer.engine.build_accelerator): "
            "a resumed run will not see the data in the same order"
        )
    ema = None
    if cfg.ema.enabled:
        ema = ModelEmaV3(
            accelerator.unwrap_model(model), decay=cfg.ema.decay, use_warmup=cfg.ema.warmup
        )

    state = TrainState()
    if accelerator.is_main_process:
        remove_partial_checkpoints(cfg.work_dir)
    accelerator.wait_for_everyone()
    folder = _resume_folder(cfg)
    if folder is not None:
        saved = load_checkpoint(accelerator, folder, ema.module if ema is not None else None)
        for group, values in zip(optimizer.param_groups, hyperparameters, strict=True):
            group.update(values)
        state = TrainState.from_dict(saved)
        saved_processes = saved.get("num_processes", accelerator.num_processes)
        if saved_processes != accelerator.num_processes:
            # Same images seen, counted in this run's per-process batches.
            state.epoch_batches = state.epoch_batches * saved_processes // accelerator.num_processes
        logger.info(
            "resumed from %s at epoch %d, iter %d (%d batches into the epoch)",
            folder,
            state.epoch,
            state.iter,
            state.epoch_batches,
        )
    elif cfg.resume == "auto":
        logger.info("resume=auto: no checkpoint in %s yet, starting fresh", cfg.work_dir)

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

    trackers = Trackers(accelerator, cfg.project, flatten(to_dict(cfg)), cfg.work_dir)
    started = {str(entry) for entry in accelerator.log_with}
    for name in cfg.trackers:
        if name not in started:
            logger.warning("tracker %s is not installed (pip install %s); skipped", name, name)
    options = RunnerOptions(
        work_dir=cfg.work_dir,
        workflow=[(phase, epochs) for phase, epochs in cfg.workflow],
        total_epochs=cfg.total_epochs,
        seed=cfg.seed,
        log_interval=cfg.log_interval,
        max_iters=cfg.max_iters,
        val_interval_iters=cfg.val_interval_iters,
        checkpoint_interval_iters=cfg.checkpoint.interval_iters,
        keep_last=cfg.checkpoint.keep_last,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
        grad_clip=cfg.optimizer.grad_clip,
        log_images=cfg.log_images,
        class_names=tuple(datasets["train"].CLASSES),
        recipe_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )
    runner = Runner(
        accelerator,
        model,
        optimizer,
        scheduler,
        loaders,
        evaluator,
        options,
        MetricsLog(cfg.work_dir, accelerator, trackers),
        trackers,
        logger,
        ema=ema,
        state=state,
    )
    try:
        metrics = runner.run()
    finally:
        trackers.finish()
    accelerator.end_training()
    return metrics


__all__ = ["NonFiniteLossError", "build_accelerator", "train_detector"]
