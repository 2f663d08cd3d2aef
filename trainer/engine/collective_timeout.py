"""A process of a multi-process run that stalls or dies: the others' collectives (gradient
sync, loss reduction, checkpoint barriers) fail after ``dist_timeout`` with a transport error
(gloo: "Timed out waiting ...ms", "Connection closed by peer"). That error becomes one
message saying what happened and where the run can continue from."""

from __future__ import annotations

import torch.distributed as dist

# What gloo and the TCP store say when the other side of a collective does not answer.
_SIGNS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")


class CollectiveTimeoutError(RuntimeError):
    """Another process did not take part in a collective in time."""


def is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc).lower() for sign in _SIGNS)


def explain(
    exc: BaseException, process_index: int, dist_timeout: int, iteration: int, latest: str | None
) -> CollectiveTimeoutError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = (
        f"the last checkpoint, {latest}, is intact: resume=auto continues from it"
        if latest
        else "no checkpoint was saved yet"
    )
    return CollectiveTimeoutError(
        f"process {process_index} stopped at iter {iteration}: another process did not "
        f"answer within dist_timeout={dist_timeout}s (it stalled or died; see its log); "
        f"{where}. ({first_line})"
    )
