import os
import pickle
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_model

from trainer.engine.checkpoint import (
    CheckpointError,
    export_weights,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    remove_partial_checkpoints,
    resolve_weights,
    save_checkpoint,
)
from trainer.engine.logging import setup_logger


def prepared(seed: int = 0):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_save_then_resolve_and_load(tmp_path):
    accelerator, model, _ = prepared()
    save_checkpoint(accelerator, tmp_path, "epoch_1", {"epoch": 1, "iter": 10})
    with torch.no_grad():
        model.weight.add_(1.0)
    folder = save_checkpoint(accelerator, tmp_path, "epoch_2", {"epoch": 2, "iter": 20})

    assert latest_checkpoint(tmp_path) == folder
    assert load_trainer_state(folder)["iter"] == 20
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # nothing half-written left
    # a work_dir, a checkpoint folder and a weights file all resolve to the same weights
    file = folder / "model.safetensors"
    assert resolve_weights(tmp_path) == resolve_weights(folder) == resolve_weights(file) == file

    fresh = torch.nn.Linear(3, 2)
    load_weights(fresh, tmp_path)
    torch.testing.assert_close(fresh.weight, model.weight)
    older = torch.nn.Linear(3, 2)
    load_weights(older, tmp_path / "checkpoints/epoch_1")
    torch.testing.assert_close(older.weight + 1.0, model.weight)


def test_keep_last_deletes_the_oldest_and_never_latest(tmp_path):
    accelerator, _, _ = prepared()
    for i in (1, 2, 3, 4):
        save_checkpoint(accelerator, tmp_path, f"iter_{i}", {"epoch": 0, "iter": i}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["iter_3", "iter_4"]
    # latest is kept even when an older-looking name would be pruned
    (tmp_path / "checkpoints/latest").write_text("iter_3")
    prune_checkpoints(tmp_path, keep_last=1)
    assert latest_checkpoint(tmp_path).name == "iter_3"


def test_a_save_killed_mid_write_leaves_latest_on_the_previous_checkpoint(tmp_path):
    accelerator, _, _ = prepared()
    good = save_checkpoint(accelerator, tmp_path, "iter_1", {"epoch": 0, "iter": 1})
    half = tmp_path / "checkpoints/.iter_2.tmp"  # what a kill during save_state leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"trunc")
    assert latest_checkpoint(tmp_path) == good
    remove_partial_checkpoints(tmp_path)
    assert not half.exists() and latest_checkpoint(tmp_path) == good


def test_resume_restores_weights_optimizer_and_random_states(tmp_path):
    accelerator, model, optimizer = prepared()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = save_checkpoint(accelerator, tmp_path, "iter_1", {"epoch": 0, "iter": 1})
    expected = (torch.rand(3), random.random(), np.random.rand())
    weight = model.weight.detach().clone()
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()

    with torch.no_grad():
        model.weight.zero_()
    optimizer.state.clear()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    state = load_checkpoint(accelerator, folder)

    assert state["iter"] == 1 and state["num_processes"] == 1
    torch.testing.assert_close(model.weight, weight)
    torch.testing.assert_close(optimizer.state_dict()["state"][0]["momentum_buffer"], momentum)
    drawn = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(drawn[0], expected[0])
    assert drawn[1:] == expected[1:]


class Payload:
    """Unpickling this runs os.system: the attack a checkpoint file could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loading_a_checkpoint_never_runs_pickled_code(tmp_path):
    setup_logger(tmp_path, True)
    accelerator, _, _ = prepared()
    folder = save_checkpoint(accelerator, tmp_path, "iter_1", {"epoch": 0, "iter": 1})
    marker = tmp_path / "pwned"
    with open(folder / "random_states_0.pkl", "wb") as f:
        pickle.dump({"step": Payload(marker)}, f)
    # Accelerate skips random states it cannot read; the engine says so
    torch.rand(1)
    load_checkpoint(accelerator, folder)
    assert "random states of process 0 were not restored" in (tmp_path / "log.txt").read_text()
    with open(folder / "optimizer.bin", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(accelerator, folder)
    assert not marker.exists()


def test_resuming_from_a_folder_that_is_not_a_checkpoint_is_a_recipe_error(tmp_path):
    accelerator, _, _ = prepared()
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(accelerator, tmp_path)


def test_exported_weights_carry_the_recipe_and_ema_weights_are_preferred(tmp_path):
    model = torch.nn.Linear(3, 2)
    file = export_weights(tmp_path / "best", model.state_dict(), "seed: 7\n", {"segm/AP": 0.5})
    with safe_open(str(file), "pt") as f:
        assert f.metadata()["recipe"] == "seed: 7\n"
    assert (tmp_path / "best/config.yaml").read_text() == "seed: 7\n"
    assert resolve_weights(tmp_path / "best") == file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_model(torch.nn.Linear(3, 2), str(folder / "model.safetensors"))
    save_model(model, str(folder / "ema.safetensors"))
    assert resolve_weights(folder) == folder / "ema.safetensors"
    loaded = torch.nn.Linear(3, 2)
    load_weights(loaded, folder)
    torch.testing.assert_close(loaded.weight, model.weight)


def test_missing_and_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights at"):
        resolve_weights(tmp_path)
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 2)), tmp_path / "w.pth")
