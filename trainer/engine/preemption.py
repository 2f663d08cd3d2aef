"""Stopping a run cleanly when the cluster asks.

Schedulers warn before they kill: SLURM sends SIGTERM on preemption or ``scancel`` (then
SIGKILL after its grace time) and, with ``--signal=USR1@SECONDS``, SIGUSR1 ahead of the time
limit; torchrun's elastic agent passes SIGTERM on to its workers. While a
:class:`StopRequest` is installed, either signal only records the request; the training loop
reads it after each update (the same on every process), writes a checkpoint of that exact
iteration and raises :class:`Preempted`, which the command turns into exit status
:data:`PREEMPTED_EXIT_CODE`. ``resume=auto`` continues from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
# How long a DataLoader worker outlives a stop signal: the training process still needs it
# for the step it is finishing and then shuts it down itself; a worker that is never shut
# down (a stuck parent) still exits.
WORKER_GRACE_SECONDS = 120


class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint of its last iteration."""

    def __init__(self, signal_name: str, checkpoint: str):
        super().__init__(
            f"stopped by {signal_name}: checkpoint {checkpoint} holds the last iteration; "
            "run again with resume=auto to continue."
        )
        self.checkpoint = checkpoint


class StopRequest:
    """Records SIGTERM / SIGUSR1 instead of dying, while installed (a context manager).

    ``requested`` is this process' view; the loop combines it over processes, so that all
    stop after the same iteration even when the signal reached only some of them.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        # Nothing else here: the handler runs between any two bytecodes of the loop.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        # Handlers can only be set from the main thread (a run started from a notebook's
        # worker thread keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def keep_worker_through_stop_signals() -> None:
    """In a DataLoader worker: outlive a stop signal sent to every process of the job (as
    SLURM does) so that the training process can finish its step; torch would otherwise
    abort that step on the worker's death. SIGUSR1 is ignored; SIGTERM, also used to end a
    stuck worker, ends it after :data:`WORKER_GRACE_SECONDS`."""

    def exit_later(signum: int, frame) -> None:
        def wait_and_exit() -> None:
            time.sleep(WORKER_GRACE_SECONDS)
            os._exit(0)

        threading.Thread(target=wait_and_exit, daemon=True).start()

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_later)
