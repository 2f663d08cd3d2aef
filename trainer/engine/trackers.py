"""Experiment trackers (W&B, TensorBoard, ...) started through ``accelerator.init_trackers``.

A tracker is an outside service: a missing login, a network outage or a bug in one must cost
a warning, never the run. Each tracker is therefore wrapped in a :class:`GuardedTracker`
before Accelerate sees it: a failing start drops that tracker, a failing call is skipped,
and each is logged once per tracker and kind of call, so an outage does not flood the log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

from trainer.engine.logging import get_logger


def _name(entry: str | GeneralTracker) -> str:
    # A name is one of Accelerate's LoggerType values (a str enum) or a plain string.
    return entry.name if isinstance(entry, GeneralTracker) else str(entry)


class GuardedTracker(GeneralTracker):
    """A tracker (an Accelerate tracker name such as "wandb", or a ``GeneralTracker``
    instance) whose calls never raise. The named ones are created at ``start`` with their
    files under ``work_dir``."""

    main_process_only = True
    requires_logging_directory = False

    def __init__(self, entry: str | GeneralTracker, project: str, work_dir: str | Path):
        super().__init__(_blank=True)
        self.entry, self.project, self.work_dir = entry, project, Path(work_dir)
        self.name = _name(entry)
        self.inner: GeneralTracker | None = None
        self._warned: set[str] = set()

    @property
    def tracker(self):
        return self.inner.tracker if self.inner is not None else None

    def _create(self) -> GeneralTracker:
        if isinstance(self.entry, GeneralTracker):
            return self.entry
        cls = LOGGER_TYPE_TO_CLASS[str(self.entry)]
        if cls.name == "wandb":
            # Offline runs (WANDB_MODE=offline) land in the work_dir, next to the run's logs.
            return cls(self.project, dir=str(self.work_dir), name=self.work_dir.name)
        if cls.requires_logging_directory:
            return cls(self.project, str(self.work_dir / cls.name))
        return cls(self.project)

    def _warn(self, what: str, exc: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            get_logger().warning(
                "tracker %s failed (%s): %s: %s; training continues",
                self.name,
                what,
                type(exc).__name__,
                exc,
            )

    def _call(self, what: str, call: Callable[[GeneralTracker], Any]) -> None:
        if self.inner is None:
            return
        try:
            call(self.inner)
        except Exception as exc:  # an outside service must never stop training
            self._warn(what, exc)

    def start(self) -> None:
        try:  # creating a named tracker may already reach its service
            self.inner = self._create()
            self.inner.start()
        except Exception as exc:
            self.inner = None
            self._warn("start", exc)

    def store_init_configuration(self, values: dict) -> None:
        self._call("config", lambda tracker: tracker.store_init_configuration(values))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._call("log", lambda tracker: tracker.log(values, step=step, **kwargs))

    def log_images(self, key: str, images: list[torch.Tensor], step: int) -> None:
        """``images``: uint8 [3, H, W] tensors, sizes may differ."""
        if self.inner is None or not hasattr(self.inner, "log_images"):
            return
        arrays = [image.permute(1, 2, 0).cpu().numpy() for image in images]

        def call(tracker: GeneralTracker) -> None:
            if tracker.name == "tensorboard":
                # SummaryWriter.add_images takes one batch; images of other sizes go apart.
                for i, array in enumerate(arrays):
                    tracker.log_images({f"{key}/{i}": array[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({key: arrays}, step=step)

        self._call("images", call)

    def finish(self) -> None:
        self._call("finish", lambda tracker: tracker.finish())


def start_trackers(
    accelerator: Accelerator, names: list[str], project: str, config: dict, work_dir: str | Path
) -> None:
    """Guard the accelerator's ``log_with`` trackers and start them with ``config`` (the
    flattened recipe) through ``accelerator.init_trackers``; afterwards ``accelerator.log``
    and ``accelerator.end_training`` reach them. ``names``: the recipe's ``trackers``, to warn
    about those Accelerate left out because their package is not installed."""
    started = {_name(entry) for entry in accelerator.log_with}
    for name in names:
        if name not in started:
            get_logger().warning(
                "tracker %s is not installed (pip install %s); skipped", name, name
            )
    accelerator.log_with = [
        GuardedTracker(entry, project, work_dir) for entry in accelerator.log_with
    ]
    if accelerator.is_main_process:
        accelerator.init_trackers(project, config)


def log_images(accelerator: Accelerator, key: str, images: list[torch.Tensor], step: int) -> None:
    """Send uint8 [3, H, W] images to every tracker that takes images (main process)."""
    for tracker in accelerator.trackers:
        if isinstance(tracker, GuardedTracker):
            tracker.log_images(key, images, step)


def has_trackers(accelerator: Accelerator) -> bool:
    return any(
        isinstance(tracker, GuardedTracker) and tracker.inner is not None
        for tracker in accelerator.trackers
    )
