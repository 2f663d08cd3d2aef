"""Run logs on the main process: ``log.txt`` and the console, and ``metrics.jsonl`` whose
records also go to the trackers (see trainer/engine/trackers.py)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

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

    def __init__(self, work_dir: str | Path, accelerator: Accelerator):
        self.path = Path(work_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process:
            # train_detector called from Python, without setup_logger, meets a new work_dir.
            self.path.parent.mkdir(parents=True, exist_ok=True)

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
        self.accelerator.log(scalars, step=record["iter"])
