"""The workflow loop: train and val phases, as mmdetection's ``workflow`` describes them."""

from __future__ import annotations

import logging
import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from trainer.engine.checkpoint import save_checkpoint
from trainer.engine.logging import MetricsLog
from trainer.evaluation.coco import CocoEvaluator, summary_table
from trainer.evaluation.inference import evaluate_on_loader


class Runner:
    """Runs ``workflow`` ([[phase, epochs], ...]) until ``total_epochs`` training epochs.

    The training step (forward, backward, optimizer and lr step) is written out in
    :meth:`train_epoch`; there are no hooks. ``max_iters`` ends training early after the
    current workflow cycle (so a following val phase still runs).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loaders: dict,
        evaluator: CocoEvaluator | None,
        work_dir: str,
        metrics_log: MetricsLog,
        logger: logging.Logger,
        log_interval: int = 20,
        max_iters: int | None = None,
        start_epoch: int = 0,
        start_iter: int = 0,
    ):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loaders = loaders
        self.evaluator = evaluator
        self.work_dir = work_dir
        self.metrics_log = metrics_log
        self.logger = logger
        self.log_interval = log_interval
        self.max_iters = max_iters
        self.epoch = start_epoch
        self.iter = start_iter
        self.stop = False
        self.last_metrics: dict[str, float] = {}

    def run(self, workflow: list, total_epochs: int) -> dict[str, float]:
        """Returns the metrics of the last val phase (empty if none ran)."""
        while self.epoch < total_epochs and not self.stop:
            for phase, epochs in workflow:
                for _ in range(epochs):
                    if phase == "train":
                        if self.epoch >= total_epochs or self.stop:
                            break
                        self.train_epoch()
                        self.epoch += 1
                        save_checkpoint(
                            self.accelerator,
                            self.work_dir,
                            {"epoch": self.epoch, "iter": self.iter},
                        )
                    else:
                        self.last_metrics = self.val_epoch()
        return self.last_metrics

    def train_epoch(self) -> None:
        loader = self.loaders["train"]
        self.model.train()
        bar = tqdm(
            total=len(loader),
            desc=f"train epoch {self.epoch + 1}",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        sums: dict[str, torch.Tensor] = {}
        count, started = 0, time.perf_counter()
        for step, (images, targets) in enumerate(loader):
            with self.accelerator.autocast():
                losses = self.model(images, targets)
            loss = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.iter += 1
            count += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach()
            bar.update(1)

            last = step + 1 == len(loader) or (self.max_iters and self.iter >= self.max_iters)
            if self.iter % self.log_interval == 0 or last:
                # Averaged over the interval and over processes: one host sync per interval.
                means = {k: v / count for k, v in sums.items()}
                means = {k: v.item() for k, v in self.accelerator.reduce(means, "mean").items()}
                means["loss"] = sum(means.values())
                lr = self.optimizer.param_groups[0]["lr"]
                elapsed = time.perf_counter() - started
                record = {"phase": "train", "epoch": self.epoch + 1, "iter": self.iter, **means}
                record.update(lr=lr, time_per_iter=elapsed / count)
                self.metrics_log.write(record)
                bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.2e}")
                self.logger.debug("iter %d: %s", self.iter, record)
                sums, count, started = {}, 0, time.perf_counter()
            if self.max_iters and self.iter >= self.max_iters:
                self.stop = True
                break
        bar.close()
        self.logger.info(
            "epoch %d done (iter %d): %s",
            self.epoch + 1,
            self.iter,
            ", ".join(f"{k} {v:.4f}" for k, v in means.items()),
        )

    def val_epoch(self) -> dict[str, float]:
        """Inference on the val loader and COCO metrics, logged as phase ``val``."""
        if self.evaluator is None:
            raise RuntimeError("the workflow has a val phase but no val dataset was built.")
        metrics = evaluate_on_loader(
            self.model,
            self.loaders["val"],
            self.evaluator,
            self.accelerator,
            desc=f"val after epoch {self.epoch}",
        )
        self.logger.info("val after epoch %d:\n%s", self.epoch, summary_table(metrics))
        self.metrics_log.write({"phase": "val", "epoch": self.epoch, "iter": self.iter, **metrics})
        return metrics
