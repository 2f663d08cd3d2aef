"""Training entry: loaders, optimizer, Accelerate preparation, resume, then the runner."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from trainer.config import RecipeError, to_dict
from trainer.data import build_dataloader
from trainer.engine.checkpoint import latest_checkpoint, load_trainer_state
from trainer.engine.logging import MetricsLog, get_logger
from trainer.engine.optim import build_lr_scheduler, build_optimizer
from trainer.engine.runner import Runner
from trainer.evaluation.coco import CocoEvaluator


def _resume_folder(cfg: DictConfig):
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(cfg.work_dir)
    return cfg.resume


def train_detector(
    model: torch.nn.Module, datasets: dict, cfg: DictConfig, accelerator: Accelerator
) -> dict[str, float]:
    """Train ``model`` on ``datasets["train"]`` following ``cfg.workflow``.

    ``datasets`` maps "train" (and "val" when the workflow has a val phase) to datasets.
    Returns the metrics of the last val phase.
    """
    logger = get_logger()
    data = cfg.data
    loaders = {
        "train": build_dataloader(
            datasets["train"], data.imgs_per_gpu, data.workers_per_gpu, shuffle=True, seed=cfg.seed
        )
    }
    if len(loaders["train"]) == 0:
        raise RecipeError(f"the training set '{data.train.ann_file}' has no usable images.")
    evaluator = None
    if "val" in datasets:
        loaders["val"] = build_dataloader(
            datasets["val"], data.imgs_per_gpu, data.workers_per_gpu, shuffle=False
        )
        evaluator = CocoEvaluator(
            datasets["val"].coco, datasets["val"].label_to_cat, accelerator=accelerator
        )

    global_batch = data.imgs_per_gpu * accelerator.num_processes
    optimizer = build_optimizer(model, cfg.optimizer, global_batch)
    logger.info(
        "global batch %d (%d processes x %d images): lr %.4g (recipe lr %.4g at %d images)",
        global_batch,
        accelerator.num_processes,
        data.imgs_per_gpu,
        optimizer.param_groups[0]["lr"],
        cfg.optimizer.lr,
        cfg.optimizer.base_batch_size,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    loaders = {name: accelerator.prepare(loader) for name, loader in loaders.items()}

    start_epoch = start_iter = 0
    folder = _resume_folder(cfg)
    if folder is not None:
        accelerator.load_state(str(folder))
        state = load_trainer_state(folder)
        start_epoch, start_iter = state["epoch"], state["iter"]
        logger.info("resumed from %s at epoch %d, iter %d", folder, start_epoch, start_iter)
    elif cfg.resume == "auto":
        logger.info("resume=auto: no checkpoint in %s yet, starting fresh", cfg.work_dir)
    # Not passed to prepare(): Accelerate would step it once per process, and the schedule
    # is per iteration of this process's loader already.
    scheduler = build_lr_scheduler(
        optimizer, cfg.lr_schedule, len(loaders["train"]), start_iter=start_iter
    )

    if cfg.trackers:
        try:
            accelerator.init_trackers(cfg.project, config=to_dict(cfg))
        except Exception as exc:  # no login or no network must not stop training
            logger.warning(
                "trackers %s could not start (%s); continuing without them", cfg.trackers, exc
            )

    runner = Runner(
        accelerator,
        model,
        optimizer,
        scheduler,
        loaders,
        evaluator,
        cfg.work_dir,
        MetricsLog(cfg.work_dir, accelerator),
        logger,
        log_interval=cfg.log_interval,
        max_iters=cfg.max_iters,
        start_epoch=start_epoch,
        start_iter=start_iter,
    )
    metrics = runner.run([tuple(step) for step in cfg.workflow], cfg.total_epochs)
    accelerator.end_training()
    return metrics


__all__ = ["train_detector"]
