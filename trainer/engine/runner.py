"""The workflow loop: train and val phases, as mmdetection's ``workflow`` describes them.

The training step is written out, with no hooks: forward and backward in
:meth:`Runner.train_epoch`, clipping, optimizer, lr and EMA updates in
:meth:`Runner._optimizer_step`. One *iteration* is one optimizer
update (``accumulation_steps`` batches); intervals, ``max_iters`` and the lr schedule count
iterations.
"""

from __future__ import annotations

import datetime
import math
import time
import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.engine.checkpoint import (
    BEST,
    FINAL,
    RECIPE_FILE,
    checkpoints_dir,
    export_weights,
    latest_checkpoint,
    save_checkpoint,
)
from trainer.engine.logging import MetricsLog, get_logger
from trainer.engine.preemption import Preempted, StopRequest
from trainer.engine.state import TrainState
from trainer.engine.trackers import has_trackers, log_images
from trainer.engine.val_phase import draw_predictions, validate
from trainer.evaluation.coco import CocoEvaluator, summary_table
from trainer.saved_recipe import saved_recipe_yaml
from trainer.weights.classes import CLASSES_FILE, ModelClasses


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many updates in a row had a non-finite loss."""


@dataclass
class LoopSettings:
    """The recipe's settings of the loop, as plain values (see trainer/config.py for each)."""

    work_dir: str
    workflow: list[tuple[str, int]]
    total_epochs: int
    seed: int = 0
    log_interval: int = 20
    max_iters: int | None = None
    val_interval_iters: int | None = None
    checkpoint_interval_iters: int | None = None
    keep_last: int = 3
    max_nonfinite_steps: int = 5
    grad_clip: float | None = None
    log_images: int = 0
    classes: ModelClasses | None = None  # written beside the weights; names the drawn classes
    recipe_yaml: str = ""  # written beside the weights

    @classmethod
    def from_recipe(cls, cfg: DictConfig, classes: ModelClasses) -> LoopSettings:
        return cls(
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
            classes=classes,
            recipe_yaml=saved_recipe_yaml(cfg),
        )

    def model_files(self) -> dict[str, str]:
        """What every checkpoint folder holds beside the weights: the recipe and the classes."""
        files = {RECIPE_FILE: self.recipe_yaml}
        if self.classes is not None:
            files[CLASSES_FILE] = self.classes.to_json()
        return files


@dataclass
class TrainingParts:
    """What the loop works with, all prepared by ``accelerator``: ``loaders`` maps "train"
    (and "val" when the workflow validates) to loaders; ``evaluator`` scores the val phase;
    ``ema`` is a timm ``ModelEmaV3`` or None."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: dict
    evaluator: CocoEvaluator | None = None
    ema: ModelEmaV3 | None = None


class LossSums:
    """Sums of the losses of finite batches, on the device (no host sync per batch), and the
    count of updates since ``started``."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.finite_batches = torch.zeros((), device=device)
        self.updates = 0
        self.started = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], finite: torch.Tensor) -> None:
        for name, value in losses.items():
            kept = torch.where(finite, value.detach().float(), 0.0)
            self.sums[name] = self.sums.get(name, 0.0) + kept
        self.finite_batches += finite.float()

    def to_dict(self) -> dict:
        """{"sums": {loss name: float}, "finite_batches": float}: exact, float32 in a double."""
        sums = {name: value.item() for name, value in self.sums.items()}
        return {"sums": sums, "finite_batches": self.finite_batches.item()}

    @classmethod
    def restored(cls, saved: list[dict] | None, accelerator: Accelerator) -> LossSums:
        """This process' sums from a checkpoint's ``interval_losses`` (one per process). With
        another number of processes the first takes them all: the log sums over processes."""
        sums = cls(accelerator.device)
        if not saved:
            return sums
        if len(saved) == accelerator.num_processes:
            mine = [saved[accelerator.process_index]]
        else:
            mine = saved if accelerator.is_main_process else []
        for entry in mine:
            for name, value in entry["sums"].items():
                value = torch.tensor(value, dtype=torch.float32, device=accelerator.device)
                sums.sums[name] = sums.sums.get(name, 0.0) + value
            sums.finite_batches += entry["finite_batches"]
        return sums


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class Runner:
    """Runs ``settings.workflow`` ([(phase, epochs), ...]) until ``total_epochs`` training
    epochs are done, from ``state`` (a fresh or a resumed one).

    ``parts.loaders["train"]`` is a prepared loader over a dataset with ``set_epoch`` (see
    :class:`trainer.seeding.SeededSamples`). ``max_iters`` ends training early, after the
    current workflow cycle (so a following val phase still runs).
    """

    def __init__(self, parts: TrainingParts, settings: LoopSettings, state: TrainState):
        self.accelerator = parts.accelerator
        self.model = parts.model
        self.optimizer = parts.optimizer
        self.scheduler = parts.scheduler
        self.loaders = parts.loaders
        self.evaluator = parts.evaluator
        self.ema = parts.ema
        self.settings = settings
        self.state = state
        self.logger = get_logger()
        resumed_from = (state.iter, state.resumed_rows) if state.iter > 0 else None
        self.metrics_log = MetricsLog(settings.work_dir, parts.accelerator, resumed_from)
        # Losses since the last train log line (a resumed run continues the saved interval).
        self.interval = LossSums.restored(state.interval_losses, parts.accelerator)
        self.stop = False
        self.stop_request = StopRequest()  # installed while run() runs
        self.stop_signalled = False  # on any process, as agreed after the last update
        self.last_metrics: dict[str, float] = {}
        self.nonfinite_streak = 0
        steps = self.accelerator.gradient_accumulation_steps
        self.iters_per_epoch = math.ceil(len(self.loaders["train"]) / steps)
        total = settings.total_epochs * self.iters_per_epoch
        self.total_iters = min(total, settings.max_iters) if settings.max_iters else total

    # ---------------------------------------------------------------- workflow
    def run(self) -> dict[str, float]:
        """Returns the metrics of the last val phase (empty if none ran).

        After a resume, the phases before the checkpoint are passed over: a val phase that
        followed the saved training epoch runs (again, if the kill came during it).
        """
        settings, state = self.settings, self.state
        start_epoch, mid_epoch = state.epoch, state.epoch_batches > 0
        if start_epoch >= settings.total_epochs and not mid_epoch:
            self.logger.info("all %d epochs are done already; nothing to train", start_epoch)
            return {}
        trained = 0
        with self.stop_request, logging_redirect_tqdm(loggers=[self.logger]):
            while trained < settings.total_epochs and not self.stop:
                for phase, epochs in settings.workflow:
                    for _ in range(epochs):
                        if phase == "train":
                            if trained >= settings.total_epochs or self.stop:
                                break
                            if trained >= start_epoch:
                                self.train_epoch()
                            trained += 1
                        elif trained > start_epoch or (trained == start_epoch and not mid_epoch):
                            self.val_phase()
            self.export(FINAL, {"epoch": state.epoch, "iter": state.iter})
        return self.last_metrics

    # ---------------------------------------------------------------- training
    def train_epoch(self) -> None:
        """One training epoch, or its rest after a resume inside it."""
        accelerator, settings, state = self.accelerator, self.settings, self.state
        if settings.max_iters and state.iter >= settings.max_iters:
            self.stop = True
            return
        loader = self.loaders["train"]
        self.model.train()
        bar = tqdm(
            total=len(loader),
            initial=state.epoch_batches,
            desc=f"train epoch {state.epoch + 1}/{settings.total_epochs}",
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
        )
        device = accelerator.device
        window_finite = torch.ones((), dtype=torch.bool, device=device)
        for images, targets in self._remaining_batches():
            with accelerator.accumulate(self.model):
                with accelerator.autocast():
                    losses = self.model(images, targets)
                loss = sum(losses.values())
                accelerator.backward(loss)
                finite = torch.isfinite(loss)
                window_finite &= finite
                self.interval.add(losses, finite)
                state.epoch_batches += 1
                bar.update(1)
                if not accelerator.sync_gradients:
                    continue
                self._optimizer_step(window_finite)
                window_finite = torch.ones((), dtype=torch.bool, device=device)
            self.interval.updates += 1
            end_of_epoch = state.epoch_batches >= len(loader)
            last = end_of_epoch or bool(settings.max_iters and state.iter >= settings.max_iters)
            interval = settings.checkpoint_interval_iters
            save = not last and bool(interval) and state.iter % interval == 0
            # Also at a checkpoint, so that a run resumed from it averages the same intervals.
            if state.iter % settings.log_interval == 0 or last or save:
                self._log_train(self.interval, bar)
                self.interval = LossSums(device)
            if settings.val_interval_iters and state.iter % settings.val_interval_iters == 0:
                self.val_phase()
            if last:
                break
            if save or self.stop_signalled:
                self.checkpoint(f"iter_{state.iter}")
            if self.stop_signalled:
                bar.close()
                self._stop_on_signal(f"iter_{state.iter}")
        bar.close()
        if state.epoch_batches >= len(loader):
            state.epoch += 1
            state.epoch_batches = 0
            self.logger.info("epoch %d done (iter %d)", state.epoch, state.iter)
            name = f"epoch_{state.epoch}"
            self.stop = bool(settings.max_iters and state.iter >= settings.max_iters)
        else:  # stopped by max_iters inside the epoch: resumable from here
            name = f"iter_{state.iter}"
            self.stop = True
        self.checkpoint(name)
        if self.stop_signalled:
            self._stop_on_signal(name)

    def _stop_on_signal(self, checkpoint: str) -> None:
        """After the checkpoint of the iteration in which a stop signal came (on any process)."""
        name = self.stop_request.signal_name or "a stop signal to another process"
        self.logger.warning(
            "%s: stopped after iter %d, saved as %s", name, self.state.iter, checkpoint
        )
        raise Preempted(name, checkpoint)

    def _remaining_batches(self):
        """The training loader at this epoch, past the batches a resumed run has done."""
        loader, state = self.loaders["train"], self.state
        # The sampler's order and the augmentations are functions of the epoch alone.
        loader.set_epoch(state.epoch)
        loader.dataset.set_epoch(state.epoch)
        if not state.epoch_batches:
            return loader
        batches = self.accelerator.skip_first_batches(loader, state.epoch_batches)
        batches.set_epoch(state.epoch)  # the new loader would otherwise restart at epoch 0
        return batches

    def _optimizer_step(self, window_finite: torch.Tensor) -> None:
        """Optimizer, lr and EMA step after the last batch of an accumulation window, unless a
        loss in the window (on any process) was not finite."""
        accelerator, state = self.accelerator, self.state
        # One host sync per update: whether to step, and whether a process was asked to stop,
        # must be known the same on every process.
        signalled = torch.tensor(float(self.stop_request.requested), device=window_finite.device)
        flags = torch.stack([(~window_finite).float(), signalled])
        bad, signalled = accelerator.reduce(flags, "sum").tolist()
        self.stop_signalled = signalled > 0
        if bad == 0:
            self.nonfinite_streak = 0
            if self.settings.grad_clip:
                accelerator.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The lr is a function of the update count, skipped updates included; torch warns when
        # it moves before any optimizer step, which after a skipped first update is intended.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()
        state.iter += 1
        if bad == 0:
            if self.ema is not None:
                self.ema.update(accelerator.unwrap_model(self.model), step=state.iter)
            return
        self.nonfinite_streak += 1
        limit = self.settings.max_nonfinite_steps
        self.logger.warning(
            "non-finite loss at iter %d (epoch %d): update skipped (%d in a row; stop at %d)",
            state.iter,
            state.epoch + 1,
            self.nonfinite_streak,
            limit,
        )
        if self.nonfinite_streak >= limit:
            latest = latest_checkpoint(self.settings.work_dir)
            where = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint yet"
            raise NonFiniteLossError(
                f"the loss was not finite for {limit} updates in a row (last at iter {state.iter}, "
                f"epoch {state.epoch + 1}); stopping ({where}). Lower optimizer.lr, set "
                "optimizer.grad_clip or check the data, then resume=auto."
            )

    def _log_train(self, logged: LossSums, bar: tqdm) -> None:
        """Losses averaged over the interval's finite batches and over processes."""
        accelerator, state = self.accelerator, self.state
        names = list(logged.sums)
        totals = torch.stack([logged.sums[name] for name in names] + [logged.finite_batches])
        totals = accelerator.reduce(totals, "sum").tolist()
        count = totals[-1]
        means = {name: (total / count if count else math.nan) for name, total in zip(names, totals)}
        means["loss"] = sum(means.values())
        lr = self.optimizer.param_groups[0]["lr"]
        time_per_iter = (time.perf_counter() - logged.started) / max(logged.updates, 1)
        record = {"phase": "train", "epoch": state.epoch + 1, "iter": state.iter, **means}
        record.update(lr=lr, time_per_iter=time_per_iter)
        if torch.cuda.is_available():
            record["memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.metrics_log.write(record)
        eta = _format_eta(time_per_iter * max(self.total_iters - state.iter, 0))
        bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.2e}")
        self.logger.info(
            "epoch %d iter %d/%d lr %.3e eta %s %.2fs/iter | %s",
            state.epoch + 1,
            state.iter,
            self.total_iters,
            lr,
            eta,
            time_per_iter,
            " ".join(f"{name} {value:.4f}" for name, value in means.items()),
        )

    # ---------------------------------------------------------------- val
    def eval_model(self) -> torch.nn.Module:
        """The weights evaluated and exported: the EMA when kept, else the prepared model
        (whose forward may be a collective, as under FSDP)."""
        return self.ema.module if self.ema is not None else self.model

    def val_phase(self) -> dict[str, float]:
        """Val losses and COCO metrics, logged as phase ``val``; exports the best weights."""
        if self.evaluator is None:
            raise RuntimeError("the workflow has a val phase but no val dataset was built.")
        accelerator, state = self.accelerator, self.state
        result = validate(
            self.eval_model(),
            self.loaders["val"],
            self.evaluator,
            accelerator,
            seed=self.settings.seed,
            keep_images=self.settings.log_images if has_trackers(accelerator) else 0,
            desc=f"val at iter {state.iter}",
        )
        metrics = result.metrics
        # After an epoch: that epoch; inside one (val_interval_iters, max_iters): the current.
        epoch = state.epoch + (1 if state.epoch_batches else 0)
        record = {"phase": "val", "epoch": epoch, "iter": state.iter}
        record.update(images=result.num_images, detections=result.num_detections)
        record.update(**result.losses, **metrics)
        self.metrics_log.write(record)
        losses = " ".join(f"{name} {value:.4f}" for name, value in result.losses.items())
        where = f"in epoch {epoch}" if state.epoch_batches else f"after epoch {epoch}"
        self.logger.info(
            "val %s (iter %d, %d images): %s\n%s",
            where,
            state.iter,
            result.num_images,
            losses,
            summary_table(metrics),
        )
        if result.images:
            self._log_images(result.images)
        key = "segm/AP" if "segm/AP" in metrics else "bbox/AP"
        if key in metrics and metrics[key] > state.best:
            state.best, state.best_metric = metrics[key], key
            self.export(BEST, {"epoch": epoch, "iter": state.iter, **metrics})
            self.logger.info("best %s %.4f so far: weights in %s", key, metrics[key], BEST)
        self.last_metrics = metrics
        return metrics

    def _log_images(self, pairs: list) -> None:
        try:
            with_masks = "segm" in self.evaluator.iou_types
            names = self.settings.classes.names if self.settings.classes else []
            drawn = draw_predictions(pairs, names, with_masks)
        except Exception as exc:  # a drawing problem must not cost the run
            self.logger.warning("could not draw val predictions: %s: %s", type(exc).__name__, exc)
            return
        log_images(self.accelerator, "val/predictions", drawn, step=self.state.iter)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, name: str) -> None:
        ema_module = self.ema.module if self.ema is not None else None
        folder = save_checkpoint(
            self.accelerator,
            self.settings.work_dir,
            name,
            {**self.state.to_dict(), "interval_losses": gather_object([self.interval.to_dict()])},
            ema_model=ema_module,
            keep_last=self.settings.keep_last,
            model_files=self.settings.model_files(),
        )
        self.logger.info("saved checkpoint %s", folder)

    def export(self, name: str, info: dict) -> None:
        """Inference weights with the recipe, as ``checkpoints/<name>``. Call on every
        process: gathering a sharded model's full state is a collective."""
        if self.ema is not None:
            state_dict = self.ema.module.state_dict()
        else:
            state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            folder = checkpoints_dir(self.settings.work_dir) / name
            export_weights(
                folder, state_dict, self.settings.recipe_yaml, info, self.settings.classes
            )
        self.accelerator.wait_for_everyone()
