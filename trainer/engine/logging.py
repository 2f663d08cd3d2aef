"""Run logs on the main process: ``log.txt`` and the console, and ``metrics.jsonl`` whose
records also go to the trackers (see trainer/engine/trackers.py).

``metrics.jsonl`` holds one run: a run started afresh in a used work_dir first renames the
earlier one ``metrics.<time of its last row>.jsonl``, and a resumed run, before its first row,
moves the rows logged after its checkpoint (which it logs again) to
``metrics.after_iter_<N>.<time>.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

LOGGER_NAME = "trainer"
METRICS_FILE = "metrics.jsonl"


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
        try:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(Path(work_dir) / "log.txt")
        except OSError as exc:
            # Imported here: checkpoint.py imports this module.
            from trainer.engine.checkpoint import WorkDirError

            raise WorkDirError(
                f"work_dir '{work_dir}' is not writable ({exc.strerror}: '{exc.filename}'): "
                "choose another work_dir."
            ) from None
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


def count_metrics_rows(work_dir: str | Path) -> int:
    """Rows in ``work_dir/metrics.jsonl`` (0 when there is none)."""
    path = Path(work_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _free_name(folder: Path, stem: str) -> Path:
    """``folder/<stem>.jsonl``, or ``<stem>.<n>.jsonl`` when that is taken."""
    path, n = folder / f"{stem}.jsonl", 1
    while path.exists():
        path, n = folder / f"{stem}.{n}.jsonl", n + 1
    return path


def set_aside_metrics(work_dir: str | Path) -> Path | None:
    """Rename a non-empty ``metrics.jsonl`` of an earlier run ``metrics.<time of its last
    row>.jsonl``, so that this run starts a fresh one; returns the new name (None: none)."""
    path = Path(work_dir) / METRICS_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = _free_name(path.parent, f"metrics.{stamp}")
    os.replace(path, kept)
    return kept


def rewind_metrics(path: Path, iteration: int, rows: int | None) -> Path | None:
    """Keep in ``path`` the first ``rows`` rows (all when None) up to ``iteration``; move the
    others (and any line cut short by a kill) to ``metrics.after_iter_<iteration>.<now>.jsonl``
    beside it. Returns that file, or None when nothing was moved."""
    if not path.is_file():
        return None
    kept, moved = [], []
    for index, line in enumerate(path.read_text().splitlines(keepends=True)):
        try:
            logged_at = json.loads(line)["iter"]
        except (ValueError, KeyError, TypeError):
            logged_at = None
        before = rows is None or index < rows
        complete = line.endswith("\n") and logged_at is not None
        (kept if before and complete and logged_at <= iteration else moved).append(line)
    if not moved:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    side = _free_name(path.parent, f"metrics.after_iter_{iteration}.{stamp}")
    side.write_text("".join(moved))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return side


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` and forwards the scalars to the
    trackers as ``<phase>/<name>`` (names with a "/" already, like ``segm/AP``, stay as they are).

    ``resumed_from``: (iteration, rows) of the checkpoint a resumed run started from, rows
    being those metrics.jsonl had then (None: unknown). Before its first row, what was logged
    after the checkpoint moves to a side file: the resumed run logs those iterations again,
    and a run with nothing left to do keeps them.
    """

    def __init__(
        self,
        work_dir: str | Path,
        accelerator: Accelerator,
        resumed_from: tuple[int, int | None] | None = None,
    ):
        self.path = Path(work_dir) / METRICS_FILE
        self.accelerator = accelerator
        self.resumed_from = resumed_from
        if accelerator.is_main_process:
            # train_detector called from Python, without setup_logger, meets a new work_dir.
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        """record: phase, epoch, iter and scalar values (losses, lr, metrics)."""
        if not self.accelerator.is_main_process:
            return
        if self.resumed_from is not None:
            iteration, rows = self.resumed_from
            self.resumed_from = None
            side = rewind_metrics(self.path, iteration, rows)
            if side is not None:
                get_logger().warning(
                    "%s: rows logged after the checkpoint at iter %d, which this run logs "
                    "again, moved to %s",
                    self.path,
                    iteration,
                    side.name,
                )
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        scalars = {
            f"{record['phase']}/{k}" if "/" not in k else k: v
            for k, v in record.items()
            if k not in ("phase", "epoch", "iter") and isinstance(v, int | float)
        }
        self.accelerator.log(scalars, step=record["iter"])
