"""Run logs: ``log.txt``, ``metrics.jsonl`` and Accelerate trackers, on the main process only.

A tracker (W&B, TensorBoard, ...) is an outside service: every call into one is guarded, so
a missing login, a network outage or a bug in a tracker costs a warning, never the run.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

LOGGER_NAME = "trainer"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logger(work_dir: str | Path, is_main: bool) -> logging.Logger:
    """Logger writing to the console and ``work_dir/log.txt`` on the main process; other
    processes only report errors, so a multi-process run has one clean log."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if is_main:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(work_dir) / "log.txt")
        file.setFormatter(formatter)
        logger.addHandler(file)
    return logger


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested recipe dict -> {"optimizer.lr": 0.02, ...}; lists become strings, since
    TensorBoard's hyperparameters only take scalars."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list | tuple):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


class Trackers:
    """The Accelerator's ``log_with`` trackers (names such as "wandb", or
    ``accelerate.tracking.GeneralTracker`` instances), started on the main process.

    A tracker whose start fails is dropped; a failing log call is skipped. Both are logged
    as warnings (once per tracker and kind of call, so an outage does not flood the log).
    """

    def __init__(self, accelerator: Accelerator, project: str, config: dict, work_dir: str | Path):
        self.trackers: list[GeneralTracker] = []
        self._warned: set[tuple[str, str]] = set()
        if not accelerator.is_main_process:
            return
        for entry in accelerator.log_with:
            name = getattr(entry, "name", str(entry))
            tracker = self._call(name, "start", lambda e=entry: self._start(e, project, work_dir))
            if tracker is None:
                continue
            self.trackers.append(tracker)
            self._call(tracker.name, "config", lambda t=tracker: t.store_init_configuration(config))

    @staticmethod
    def _start(entry: Any, project: str, work_dir: str | Path) -> GeneralTracker:
        if isinstance(entry, GeneralTracker):
            tracker = entry
        else:
            cls = LOGGER_TYPE_TO_CLASS[str(entry)]
            if cls.name == "wandb":
                # Offline runs (WANDB_MODE=offline) land in the work_dir, next to the run's logs.
                tracker = cls(project, dir=str(work_dir), name=Path(work_dir).name)
            elif cls.requires_logging_directory:
                tracker = cls(project, str(Path(work_dir) / cls.name))
            else:
                tracker = cls(project)
        tracker.start()
        return tracker

    def _call(self, name: str, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # an outside service must never stop training
            if (name, what) not in self._warned:
                self._warned.add((name, what))
                get_logger().warning(
                    "tracker %s failed (%s): %s: %s; training continues",
                    name,
                    what,
                    type(exc).__name__,
                    exc,
                )
            return None

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            self._call(tracker.name, "log", lambda t=tracker: t.log(values, step=step))

    def log_images(self, key: str, images: list[torch.Tensor], step: int) -> None:
        """``images``: uint8 [3, H, W] tensors, sizes may differ."""
        arrays = [image.permute(1, 2, 0).cpu().numpy() for image in images]
        for tracker in self.trackers:
            if not hasattr(tracker, "log_images"):
                continue
            if tracker.name == "tensorboard":
                # SummaryWriter.add_images takes one batch; images of different sizes go apart.
                def call(t=tracker):
                    for i, array in enumerate(arrays):
                        t.log_images({f"{key}/{i}": array[None]}, step=step, dataformats="NHWC")
            else:

                def call(t=tracker):
                    t.log_images({key: arrays}, step=step)

            self._call(tracker.name, "images", call)

    def finish(self) -> None:
        for tracker in self.trackers:
            self._call(tracker.name, "finish", tracker.finish)


def _clean(value: Any) -> Any:
    # NaN is not JSON; -1 (COCO's "no ground truth in this range") passes through.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.floating | np.integer):
        return value.item()
    return value


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` and forwards the scalars to the
    trackers as ``<phase>/<name>`` (names with a "/" already, like ``segm/AP``, stay as they are).
    """

    def __init__(self, work_dir: str | Path, accelerator: Accelerator, trackers: Trackers):
        self.path = Path(work_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.trackers = trackers

    def write(self, record: dict) -> None:
        """record: phase, epoch, iter and scalar values (losses, lr, metrics)."""
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        scalars = {
            f"{record['phase']}/{k}" if "/" not in k else k: v
            for k, v in record.items()
            if k not in ("phase", "epoch", "iter") and isinstance(v, int | float)
        }
        self.trackers.log(scalars, step=record["iter"])
