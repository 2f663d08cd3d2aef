"""One training run per work_dir, a work_dir that can take the run's checkpoints, and a
reused work_dir that says so.

``<work_dir>/train.lock`` is held by the main process for the whole run: a POSIX record lock
(``fcntl.lockf``) on the open file, which the OS releases when the process ends however it
ends (a crash, a kill), so a lock left by a dead run is never in force. Unlike ``flock``, it
is not shared with the processes forked from it: loader workers outliving a killed run do not
keep its work_dir; and it also holds across hosts on NFS. The file's text (pid, host, start time)
names the holder in the error a second run gets, and in the warning of a run that takes over
from one that ended without releasing it. The main process decides; the others learn its
verdict through one collective, so that every process stops with the same error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from trainer.engine.checkpoint import (
    CheckpointSize,
    WorkDirError,
    checkpoints_dir,
    periodic_checkpoints,
)
from trainer.engine.logging import get_logger, set_aside_metrics

LOCK_FILE = "train.lock"
# lockf fails with these on file systems without locks: the pid and host decide there.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _not_writable(work_dir: str | Path, exc: OSError) -> WorkDirError:
    return WorkDirError(
        f"work_dir '{work_dir}' is not writable ({exc.strerror}: '{exc.filename}'): "
        "choose another work_dir."
    )


def _describe(holder: dict) -> str:
    if not holder:
        return "no details in the lock file"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WorkDirLock:
    """The lock of one work_dir in this process: :meth:`acquire`, :meth:`release`. Take it
    through :func:`hold_work_dir`: a POSIX lock is dropped when its process closes any file
    descriptor of the file, so a process must open it once."""

    def __init__(self, work_dir: str | Path):
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / LOCK_FILE
        self.fd: int | None = None
        # Warnings made before the run's logger was set up: logged by log_lock_notices.
        self.pending: list[str] = []

    def _warn(self, message: str) -> None:
        logger = get_logger()
        if logger.handlers:
            logger.warning(message)
        else:
            self.pending.append(message)

    def _read(self) -> dict:
        try:
            text = os.pread(self.fd, 4096, 0).decode(errors="replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict, hint: str = "") -> WorkDirError:
        return WorkDirError(
            f"work_dir '{self.work_dir}' is in use by another training run ({_describe(holder)}; "
            f"lock {self.path}): wait for it to end or choose another work_dir{hint}."
        )

    def acquire(self) -> None:
        """Take the lock, or raise :class:`WorkDirError` naming the run that holds it."""
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _not_writable(self.work_dir, exc) from None
        try:
            self._lock()
            previous = self._read()
            if previous:
                # The text is cleared on release: a holder that left it ended abruptly.
                elsewhere = previous.get("host") != socket.gethostname()
                self._warn(
                    f"work_dir {self.work_dir}: lock left by a run that ended without "
                    f"releasing it ({_describe(previous)}{', another host' if elsewhere else ''}"
                    "): taking it over"
                )
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(record).encode(), 0)
            os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise

    def _lock(self) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise self._busy(self._read()) from None
            if exc.errno not in NO_LOCKS:
                raise _not_writable(self.work_dir, exc) from None
            holder = self._read()
            if not holder:
                return
            same_host = holder.get("host") == socket.gethostname()
            if not same_host or _pid_running(int(holder.get("pid", 0))):
                # A process on another host cannot be checked from here.
                raise self._busy(
                    holder,
                    f" (this file system has no file locks: if that run has ended, delete "
                    f"{self.path})",
                ) from None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean end: the next run takes over without a warning
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


# Locks this process holds (lock file, resolved) -> [lock, depth]: holding a work_dir again
# (a command that holds it around train_detector) is no second lock.
_HELD: dict[Path, list] = {}


def _main_verdict(accelerator: Accelerator, error: str | None) -> str | None:
    """The main process' ``error`` on every process (a collective when there are several)."""
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error], from_process=0)[0]
    return error


@contextlib.contextmanager
def hold_work_dir(accelerator: Accelerator, work_dir: str | Path) -> Iterator[None]:
    """Hold ``work_dir`` for this run (on the main process; call on every process): a work_dir
    another run holds, or one that cannot be written, raises :class:`WorkDirError` on every
    process. Released on leaving, normally or by an exception."""
    key = (Path(work_dir) / LOCK_FILE).resolve()
    entry, error = None, None
    if accelerator.is_main_process:
        entry = _HELD.get(key)
        if entry is None:
            lock = WorkDirLock(work_dir)
            try:
                lock.acquire()
                entry = _HELD[key] = [lock, 0]
            except WorkDirError as exc:
                error = str(exc)
        if entry is not None:
            entry[1] += 1
    error = _main_verdict(accelerator, error)
    if error is not None:
        raise WorkDirError(error)
    try:
        yield
    finally:
        if entry is not None:
            _leave(key, entry)


def log_lock_notices(work_dir: str | Path) -> None:
    """Log what taking the lock of ``work_dir`` found (a lock taken over from a run that
    died) once the run's logger is set up: the lock is taken before anything is written,
    log.txt included."""
    entry = _HELD.get((Path(work_dir) / LOCK_FILE).resolve())
    if entry is not None:
        for message in entry[0].pending:
            get_logger().warning(message)
        entry[0].pending.clear()


def _leave(key: Path, entry: list) -> None:
    entry[1] -= 1
    if entry[1] == 0:
        del _HELD[key]
        entry[0].release()


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_work_dir_space(
    accelerator: Accelerator, work_dir: str | Path, size: CheckpointSize, keep_last: int
) -> None:
    """Before training: ``work_dir/checkpoints`` must be writable and have room for a
    checkpoint of ``size`` and exported weights, or :class:`WorkDirError` on every process.
    Too little room for ``keep_last`` checkpoints is a warning."""
    error = None
    if accelerator.is_main_process:
        folder = checkpoints_dir(work_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_check.{os.getpid()}"
            with open(probe, "wb") as f:
                f.write(b"0")
                os.fsync(f.fileno())
            probe.unlink()
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            error = str(_not_writable(work_dir, exc))
        else:
            needed = size.checkpoint + size.export
            if free < needed:
                error = (
                    f"not enough free disk space in '{folder}': about {_size(needed)} needed "
                    f"(a checkpoint {_size(size.checkpoint)}, exported weights "
                    f"{_size(size.export)}), {_size(free)} free; free space or choose another "
                    "work_dir."
                )
            elif keep_last and free < keep_last * size.checkpoint + 2 * size.export:
                get_logger().warning(
                    "%s: %s free, less than the %d checkpoints of checkpoint.keep_last and the "
                    "exported weights need (about %s)",
                    folder,
                    _size(free),
                    keep_last,
                    _size(keep_last * size.checkpoint + 2 * size.export),
                )
    error = _main_verdict(accelerator, error)
    if error is not None:
        raise WorkDirError(error)


def note_fresh_start(work_dir: str | Path, resume: str | None) -> None:
    """On the main process of a run that starts fresh: an earlier run's metrics.jsonl is
    renamed, and a work_dir reused without ``resume`` says so."""
    complete = [folder.name for folder in periodic_checkpoints(work_dir)]
    kept = set_aside_metrics(work_dir)
    if resume is None and (kept or complete):
        found = f"checkpoints {', '.join(complete)}" if complete else "no checkpoint"
        metrics = f"its metrics.jsonl is now {kept.name}" if kept else "no metrics.jsonl"
        get_logger().warning(
            "work_dir %s holds an earlier run (%s; %s) and resume is not set: starting fresh; "
            "checkpoints of the same name will be saved over (resume=auto would continue it)",
            work_dir,
            found,
            metrics,
        )
    elif kept:
        get_logger().info("starting fresh: the earlier metrics.jsonl is now %s", kept.name)
