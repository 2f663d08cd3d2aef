"""Checkpoints under ``work_dir/checkpoints``.

- ``epoch_<E>/`` and ``iter_<N>/``: what resuming needs. Accelerate's state (``model.safetensors``,
  optimizer, grad scaler, per-process random states), ``ema.safetensors`` when an EMA is kept,
  and ``trainer_state.json`` (epoch, iteration, position inside the epoch, best metric).
- ``latest``: a text file naming the newest complete one.
- ``best/`` (highest segm AP so far) and ``final/`` (end of training): weights for inference,
  ``model.safetensors`` with the resolved recipe and the classes in its metadata.

Every one of them also holds ``config.yaml`` (the resolved recipe) and ``classes.json`` (the
class names and category ids of labels 1..K), so that a checkpoint alone is enough to
predict, evaluate or fine-tune from.

Everything is written to a hidden folder ``.<name>.tmp``, flushed to disk (each file and the
folder) and renamed into place; a folder being replaced is first renamed ``.<name>.old`` and
deleted only once the new one is in place. ``trainer_state.json`` is written last and lists
every file with its size, so a folder whose files do not match it is known to be incomplete.
``resume=auto`` takes the folder ``latest`` names when it is complete, else the newest
complete one. Loading never unpickles code: weights are safetensors, and Accelerate reads its
optimizer, scaler and random-state files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, load_model, save_file, save_model

from trainer.engine.logging import count_metrics_rows, get_logger
from trainer.weights.classes import ModelClasses

LATEST = "latest"
BEST = "best"
FINAL = "final"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
RECIPE_FILE = "config.yaml"
INFO_FILE = "info.json"


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used: not one, or not of this model; or a
    checkpoint that could not be saved."""


class WorkDirError(CheckpointError):
    """A work_dir this run cannot use: another run holds it, or it is read-only or too full."""


def checkpoints_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "checkpoints"


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        _fsync(path)
    _fsync(folder)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _recover_replaced(final: Path) -> None:
    """Finish a replacement of ``final`` that was interrupted: put the old folder back when
    the new one never arrived, else delete it (the new one is in place)."""
    old = _old_name(final)
    if not old.is_dir():
        return
    if final.exists():
        shutil.rmtree(old)
    else:
        os.replace(old, final)
        _fsync(final.parent)
        get_logger().warning(
            "%s: put back from %s (a save was interrupted while replacing it)", final, old.name
        )


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a completed folder into place. An existing one is renamed aside first and deleted
    only once the new one is in place, so that a crash leaves one of the two complete."""
    _fsync_tree(tmp)
    _recover_replaced(final)
    old = _old_name(final)
    if final.exists():
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        _fsync(final.parent)
        # The new folder is in place: what stays of the old one is cleared at the next save.
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync(final.parent)


def _listed_files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> size in bytes)."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def checkpoint_problem(folder: str | Path) -> str | None:
    """What makes ``folder`` unusable as a resume checkpoint (missing, incomplete or
    unreadable), or None when it is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder.name} does not exist"
    if not (folder / STATE_FILE).is_file():
        return f"{folder.name} has no {STATE_FILE}"
    try:
        files = load_trainer_state(folder).get("files", {})
    except (OSError, ValueError) as exc:
        return f"{folder.name}/{STATE_FILE} is unreadable ({exc})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{folder.name}/{name} is missing"
        if path.stat().st_size != size:
            return f"{folder.name}/{name} has {path.stat().st_size} bytes, {size} were saved"
    return None


class CheckpointSize(NamedTuple):
    """Bytes on disk: a resume checkpoint, and exported weights (``best``, ``final``)."""

    checkpoint: int
    export: int


def estimate_checkpoint_size(
    model: torch.nn.Module, optimizer_states: int, ema: bool
) -> CheckpointSize:
    """From the model's parameters and buffers: its weights, ``optimizer_states`` tensors per
    trainable parameter (SGD's momentum: 1, AdamW's two moments: 2) and an EMA copy."""
    tensors = [*model.parameters(), *model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint = weights + optimizer_states * trainable + (weights if ema else 0)
    return CheckpointSize(checkpoint, weights)


def rng_fingerprint() -> str:
    """Digest of this process' torch random state, to check that a resume restored it."""
    return hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()


def save_checkpoint(
    accelerator: Accelerator,
    work_dir: str | Path,
    name: str,
    state: dict,
    ema_model: torch.nn.Module | None = None,
    keep_last: int = 0,
    model_files: dict[str, str] | None = None,
) -> Path:
    """Save the Accelerate state plus ``state`` (JSON-serializable) as ``checkpoints/<name>``,
    point ``latest`` at it, then delete all but the ``keep_last`` newest (0: keep all).
    ``model_files`` (file name -> text, e.g. ``config.yaml``, ``classes.json``) are written
    into the folder too.

    Call on every process: each writes its own random state. A save that fails on any process
    (a full disk, an I/O error) raises :class:`CheckpointError` on every process, with the
    previous checkpoints and ``latest`` as they were.
    """
    root = checkpoints_dir(work_dir)
    tmp = root / f".{name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # an earlier attempt at this same save
    accelerator.wait_for_everyone()
    fingerprints = gather_object([rng_fingerprint()])
    error = _attempt(accelerator.save_state, str(tmp), safe_serialization=True)
    # Every process takes part in the same collectives whether or not its writes failed.
    error = _any_error(accelerator, error)
    if error is None and accelerator.is_main_process:
        full_state = {**state, "num_processes": accelerator.num_processes, "rng": fingerprints}
        error = _attempt(
            _complete_checkpoint, tmp, root / name, full_state, ema_model, model_files, work_dir
        )
    error = _any_error(accelerator, error)
    if error is None and accelerator.is_main_process and keep_last > 0:
        pruned = _attempt(prune_checkpoints, work_dir, keep_last)
        if pruned is not None:  # the checkpoint is saved; only older ones stay
            get_logger().warning("could not delete old checkpoints in %s: %s", root, pruned)
    if error is not None:
        cause = _write_failure(error, root)  # as the save met it
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # this failed attempt: frees its space
        latest = latest_checkpoint(work_dir)
        kept = f"the last complete one, {latest.name}, is intact" if latest else "none saved yet"
        raise CheckpointError(
            f"could not save checkpoint {name} in '{root}': {cause} ({kept}); free space or "
            "fix the folder, then resume=auto."
        )
    return root / name


# Less room than this after a failed save: the disk filled up (writers like torch.save do
# not say so).
DISK_FULL_BYTES = 2**20


def _write_failure(error: str, folder: Path) -> str:
    """``error`` of a failed write in ``folder``, with the room left there; a full disk
    said plainly (torch.save reports one as "unexpected pos" at best)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f"{error} (free space unknown)"
    room = f"{free / 2**20:.1f} MiB free"
    if free < DISK_FULL_BYTES or "No space left" in error:
        return f"the disk is full ({room}; {error})"
    return f"{error} ({room})"


def _attempt(function, *args, **kwargs) -> str | None:
    """None when ``function`` succeeds, else its error in one line."""
    try:
        function(*args, **kwargs)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _any_error(accelerator: Accelerator, error: str | None) -> str | None:
    """The first error of any process, on every process (a collective)."""
    if accelerator.num_processes == 1:
        return error
    errors = gather_object([error])
    return next((e for e in errors if e is not None), None)


def _complete_checkpoint(
    tmp: Path,
    final: Path,
    state: dict,
    ema_model: torch.nn.Module | None,
    model_files: dict[str, str] | None,
    work_dir: str | Path,
) -> None:
    """Add the main process' files to ``tmp``, the state file last (listing every file and its
    size), flush and rename it to ``final``, then point ``latest`` at it."""
    if ema_model is not None:
        save_model(ema_model, str(tmp / EMA_FILE))
    for file_name, text in (model_files or {}).items():
        (tmp / file_name).write_text(text)
    # metrics_rows: the rows of metrics.jsonl logged up to this checkpoint; a run resumed from
    # it sets aside the rows after them, which it logs again.
    state = {**state, "saved_at": time.time(), "metrics_rows": count_metrics_rows(work_dir)}
    (tmp / STATE_FILE).write_text(json.dumps({**state, "files": _listed_files(tmp)}, indent=1))
    _replace_dir(tmp, final)
    _write_atomic(final.parent / LATEST, final.name)


def _saved_at(folder: Path) -> tuple[float, int]:
    state = load_trainer_state(folder)
    saved_at = state.get("saved_at") or (folder / STATE_FILE).stat().st_mtime
    return saved_at, state["iter"]


def periodic_checkpoints(work_dir: str | Path) -> list[Path]:
    """Complete resume checkpoints, oldest first (by the time they were saved: a run started
    afresh in a used work_dir saves lower iterations after higher ones)."""
    folders = [
        path
        for path in checkpoints_dir(work_dir).glob("*")
        if path.is_dir() and not path.name.startswith(".") and checkpoint_problem(path) is None
    ]
    return sorted(folders, key=_saved_at)


def prune_checkpoints(work_dir: str | Path, keep_last: int) -> None:
    """Delete resume checkpoints older than the ``keep_last`` newest; ``latest`` is kept."""
    latest = latest_checkpoint(work_dir)
    for folder in periodic_checkpoints(work_dir)[:-keep_last]:
        if folder != latest:
            shutil.rmtree(folder)


def remove_partial_checkpoints(work_dir: str | Path) -> None:
    """Clean up after a save that was killed: a folder renamed aside to be replaced is put
    back (or deleted when its replacement is in place), and hidden ``.<name>.tmp`` folders
    that are provably incomplete (neither a complete checkpoint nor complete exported weights)
    are deleted. Complete ones are left as they are. Call with the work_dir held."""
    root = checkpoints_dir(work_dir)
    for old in root.glob(".*.old"):
        _recover_replaced(root / old.name[1 : -len(".old")])
    for tmp in root.glob(".*.tmp"):
        if not tmp.is_dir():
            continue
        if checkpoint_problem(tmp) is None or (tmp / INFO_FILE).is_file():
            get_logger().info("%s: an unfinished save, complete; left as it is", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def find_latest(work_dir: str | Path) -> tuple[Path | None, str | None]:
    """(checkpoint, problem): the folder ``latest`` names when it is complete; else the newest
    complete one (None if there is none), with why ``latest`` could not be used."""
    root = checkpoints_dir(work_dir)
    pointer = root / LATEST
    problem = None
    if pointer.is_file():
        name = pointer.read_text().strip()
        problem = checkpoint_problem(root / name) if name else "it is empty"
        if problem is None:
            return root / name, None
        problem = f"checkpoints/{LATEST} names '{name}', but {problem}"
    complete = periodic_checkpoints(work_dir)
    if problem is None and complete:
        problem = f"checkpoints/{LATEST} is missing"
    return (complete[-1] if complete else None), problem


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the folder ``latest`` names, or the newest complete one
    when that one is missing or incomplete; None when there is none yet."""
    return find_latest(work_dir)[0]


def load_trainer_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def load_checkpoint(
    accelerator: Accelerator, folder: str | Path, ema_model: torch.nn.Module | None = None
) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the prepared objects and this process'
    random states; returns the trainer state. Call on every process."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(
            f"'{folder}' is not a training checkpoint (no {STATE_FILE}); resume takes a folder "
            "under <work_dir>/checkpoints, or resume=auto."
        )
    accelerator.load_state(str(folder))
    state = load_trainer_state(folder)
    if ema_model is not None:
        if (folder / EMA_FILE).is_file():
            load_model(ema_model, folder / EMA_FILE, device=str(accelerator.device))
        else:
            get_logger().warning("%s holds no EMA weights: the EMA restarts from the model", folder)
    fingerprints = state.get("rng", [])
    index = accelerator.process_index
    # Accelerate only logs (at debug level) when it cannot restore random states.
    if index >= len(fingerprints) or fingerprints[index] != rng_fingerprint():
        get_logger().warning(
            "random states of process %d were not restored from %s (saved with %d processes, "
            "now %d): the resumed run will not repeat an uninterrupted one exactly",
            index,
            folder,
            state.get("num_processes", 0),
            accelerator.num_processes,
        )
    return state


def export_weights(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    recipe_yaml: str,
    info: dict,
    classes: ModelClasses | None = None,
) -> Path:
    """Write inference weights: ``model.safetensors`` (the recipe YAML, ``info`` and the
    classes in its metadata), ``config.yaml``, ``classes.json`` and ``info.json``, renamed
    into place as a whole (``info.json`` last). A failed write leaves the previous folder as
    it was and raises :class:`CheckpointError`."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier attempt at this same export
    metadata = {"recipe": recipe_yaml, "info": json.dumps(info)}
    if classes is not None:
        metadata["classes"] = classes.to_json()
    tensors = {name: value.detach().cpu().contiguous() for name, value in state_dict.items()}

    def write() -> None:
        tmp.mkdir(parents=True)
        if classes is not None:
            classes.save(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / RECIPE_FILE).write_text(recipe_yaml)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        _replace_dir(tmp, folder)

    error = _attempt(write)
    if error is not None:
        cause = _write_failure(error, folder.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = "the previous one is intact" if folder.is_dir() else "none was there"
        raise CheckpointError(
            f"could not write weights to '{folder}': {cause} ({previous}); free space or fix "
            "the folder."
        )
    return folder / WEIGHTS_FILE


def resolve_weights(path: str | Path) -> Path:
    """A work_dir (its latest checkpoint), a checkpoint folder or a weights file -> the file.

    In a checkpoint folder the EMA weights, when kept, are the ones evaluated during training
    and are preferred.
    """
    path = Path(path)
    if path.is_file():
        return path
    for name in (EMA_FILE, WEIGHTS_FILE):
        if (path / name).is_file():
            return path / name
    latest = latest_checkpoint(path)
    if latest is not None:
        return resolve_weights(latest)
    raise FileNotFoundError(
        f"no weights at '{path}': expected a .safetensors/.pth file, a checkpoint folder "
        f"holding {WEIGHTS_FILE}, or a work_dir with checkpoints/{LATEST}."
    )


def load_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Load model weights (safetensors, or a weights-only torch file) strictly."""
    file = resolve_weights(path)
    if file.suffix == ".safetensors":
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in '{file}' do not fit the model built from the recipe: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )
    return file
