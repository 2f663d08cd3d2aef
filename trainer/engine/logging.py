"""Run logs: ``log.txt``, ``metrics.jsonl`` and trackers, written by the main process only."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from accelerate import Accelerator

LOGGER_NAME = "trainer"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logger(work_dir: str | Path, is_main: bool) -> logging.Logger:
    """Logger writing to the console and ``work_dir/log.txt`` on the main process; other
    processes only report errors, so a multi-process run has one clean log."""
    logger = logging.getLogger(LOGGER_NAME)
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


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` and forwards it to trackers."""

    def __init__(self, work_dir: str | Path, accelerator: Accelerator):
        self.path = Path(work_dir) / "metrics.jsonl"
        self.accelerator = accelerator

    def write(self, record: dict) -> None:
        """record: phase, epoch, iter and scalar values (losses, lr, metrics)."""
        if not self.accelerator.is_main_process:
            return
        clean = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        scalars = {
            f"{record['phase']}/{k}" if "/" not in k else k: v
            for k, v in record.items()
            if k not in ("phase", "epoch", "iter") and isinstance(v, int | float)
        }
        try:
            self.accelerator.log(scalars, step=record["iter"])
        except Exception as exc:  # a tracker outage must not stop training
            get_logger().warning("tracker logging failed: %s", exc)
