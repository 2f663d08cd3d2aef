"""Where a training run is: the state saved in every checkpoint and restored on resume."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint. ``epoch``: completed training epochs;
    ``iter``: updates so far; ``epoch_batches``: batches (per process) consumed in the current
    epoch; ``best``: best val metric so far (``best_metric`` names it); ``interval_losses``:
    per process, the loss sums of the log interval in progress (only a checkpoint taken on a
    stop signal, between two log lines, has any), so that a resumed run logs what an
    uninterrupted one would. ``resumed_rows``: in a resumed run, the rows metrics.jsonl had
    when its checkpoint was saved (None: fresh run, or not known)."""

    epoch: int = 0
    iter: int = 0
    epoch_batches: int = 0
    best: float = -math.inf
    best_metric: str = ""
    interval_losses: list[dict] | None = None
    resumed_rows: int | None = None  # not saved: set by train.restore

    def to_dict(self) -> dict:
        best = None if math.isinf(self.best) else self.best
        return {
            "epoch": self.epoch,
            "iter": self.iter,
            "epoch_batches": self.epoch_batches,
            "best": best,
            "best_metric": self.best_metric,
            "interval_losses": self.interval_losses,
        }

    @classmethod
    def from_dict(cls, state: dict) -> TrainState:
        best = state.get("best")
        return cls(
            epoch=state["epoch"],
            iter=state["iter"],
            epoch_batches=state.get("epoch_batches", 0),
            best=-math.inf if best is None else best,
            best_metric=state.get("best_metric", ""),
            interval_losses=state.get("interval_losses"),
        )
