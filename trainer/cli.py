"""Entry points of the commands: a known user error becomes one line on stderr and an exit
status, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def fail(exc: Exception, code: int, prefix: str = "error") -> None:
    """Print ``<prefix>: <exc>`` (once: only local rank 0 under ``accelerate launch``), exit."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{prefix}: {exc}", file=sys.stderr)
    sys.exit(code)


def run_main(main: Callable[[], object], errors: tuple[type[Exception], ...] = ()) -> None:
    """Call ``main``. Errors the user can fix (a recipe value, a missing file, a checkpoint
    that does not fit, images too large for the backbone, or one of ``errors``) exit with
    status 2; a training run stopped by non-finite losses or by another process that did not
    answer in time exits with status 1, and one stopped by SIGTERM / SIGUSR1 after its
    checkpoint with status 75 (see trainer/engine/preemption.py)."""
    try:
        main()
    except Exception as exc:
        # Imported only now: `--help` stays quick, and main() has imported them already.
        from trainer.config import RecipeError
        from trainer.engine.checkpoint import CheckpointError
        from trainer.engine.collective_timeout import CollectiveTimeoutError
        from trainer.engine.preemption import PREEMPTED_EXIT_CODE, Preempted
        from trainer.engine.runner import NonFiniteLossError
        from trainer.models.backbone import InputSizeError

        user_errors = (RecipeError, CheckpointError, InputSizeError, FileNotFoundError)
        if isinstance(exc, (*user_errors, *errors)):
            fail(exc, 2)
        if isinstance(exc, NonFiniteLossError | CollectiveTimeoutError):
            fail(exc, 1)
        if isinstance(exc, Preempted):
            fail(exc, PREEMPTED_EXIT_CODE, prefix="stopped")
        raise
