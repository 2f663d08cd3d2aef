"""Checkpoints under ``work_dir/checkpoints``: one Accelerate state folder per epoch and a
``latest`` pointer; weights are read back from the folder's ``model.safetensors``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from trainer.config import RecipeError

LATEST = "latest"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"


def checkpoints_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, work_dir: str | Path, state: dict) -> Path:
    """Save model, optimizer and RNG states plus ``state`` (epoch, iter) as ``epoch_<N>``.

    Written to a temporary folder and renamed into place before ``latest`` moves, so a crash
    mid-write never leaves a broken latest checkpoint. Call on every process.
    """
    root = checkpoints_dir(work_dir)
    name = f"epoch_{state['epoch']}"
    tmp = root / f".{name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, name)
    accelerator.wait_for_everyone()
    return root / name


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The folder ``latest`` points to, or None when there is none yet."""
    pointer = checkpoints_dir(work_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoints_dir(work_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_trainer_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def resolve_weights(path: str | Path) -> Path:
    """A work_dir (its latest checkpoint), a checkpoint folder or a weights file -> the file."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    latest = latest_checkpoint(path)
    if latest is not None and (latest / WEIGHTS_FILE).is_file():
        return latest / WEIGHTS_FILE
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
        raise RecipeError(
            f"weights in '{file}' do not fit the model built from the recipe: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )
    return file
