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

Everything is written to a hidden folder first and renamed into place, so a crash mid-write
never leaves a broken checkpoint behind ``latest``. Loading never unpickles code: weights are
safetensors, and Accelerate reads its optimizer, scaler and random-state files with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, load_model, save_file, save_model

from trainer.engine.logging import get_logger
from trainer.weights.classes import ModelClasses

LATEST = "latest"
BEST = "best"
FINAL = "final"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
RECIPE_FILE = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used: not one, or not of this model."""


def checkpoints_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a completed folder into place (the old one, if any, is removed first)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


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

    Call on every process: each writes its own random state.
    """
    root = checkpoints_dir(work_dir)
    tmp = root / f".{name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    fingerprints = gather_object([rng_fingerprint()])
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema_model is not None:
            save_model(ema_model, str(tmp / EMA_FILE))
        full_state = {**state, "num_processes": accelerator.num_processes, "rng": fingerprints}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
        for file_name, text in (model_files or {}).items():
            (tmp / file_name).write_text(text)
        _replace_dir(tmp, root / name)
        _write_atomic(root / LATEST, name)
        if keep_last > 0:
            prune_checkpoints(work_dir, keep_last)
    accelerator.wait_for_everyone()
    return root / name


def periodic_checkpoints(work_dir: str | Path) -> list[Path]:
    """Complete resume checkpoints, oldest first (by iteration)."""
    folders = [
        path
        for path in checkpoints_dir(work_dir).glob("*")
        if path.is_dir() and not path.name.startswith(".") and (path / STATE_FILE).is_file()
    ]
    return sorted(folders, key=lambda path: load_trainer_state(path)["iter"])


def prune_checkpoints(work_dir: str | Path, keep_last: int) -> None:
    """Delete resume checkpoints older than the ``keep_last`` newest; ``latest`` is kept."""
    latest = latest_checkpoint(work_dir)
    for folder in periodic_checkpoints(work_dir)[:-keep_last]:
        if folder != latest:
            shutil.rmtree(folder)


def remove_partial_checkpoints(work_dir: str | Path) -> None:
    """Delete hidden folders left by a save that was killed mid-write."""
    for tmp in checkpoints_dir(work_dir).glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The folder ``latest`` points to, or None when there is none yet."""
    pointer = checkpoints_dir(work_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoints_dir(work_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


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
    into place as a whole."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    metadata = {"recipe": recipe_yaml, "info": json.dumps(info)}
    if classes is not None:
        metadata["classes"] = classes.to_json()
        classes.save(tmp)
    tensors = {name: value.detach().cpu().contiguous() for name, value in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
    (tmp / RECIPE_FILE).write_text(recipe_yaml)
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    _replace_dir(tmp, folder)
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
