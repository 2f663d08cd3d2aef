"""Entry points of the commands: a known user error becomes one line on stderr and an exit
status, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def fail(exc: Exception, code: int) -> None:
    """Print ``error: <exc>`` (once: only local rank 0 under ``accelerate launch``), exit."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {exc}", file=sys.stderr)
    sys.exit(code)


def run_main(main: Callable[[], object], errors: tuple[type[Exception], ...] = ()) -> None:
    """Call ``main``; RecipeError, FileNotFoundError and ``errors`` exit with status 2."""
    from trainer.config import RecipeError

    try:
        main()
    except (RecipeError, FileNotFoundError, *errors) as exc:
        fail(exc, 2)
