import pytest
import torch
from accelerate import Accelerator

from trainer.config import RecipeError
from trainer.engine.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    resolve_weights,
    save_checkpoint,
)


def test_save_then_resolve_and_load(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    save_checkpoint(accelerator, tmp_path, {"epoch": 1, "iter": 10})
    with torch.no_grad():
        model.weight.add_(1.0)
    folder = save_checkpoint(accelerator, tmp_path, {"epoch": 2, "iter": 20})

    assert latest_checkpoint(tmp_path) == folder
    assert load_trainer_state(folder) == {"epoch": 2, "iter": 20}
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


def test_missing_and_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights at"):
        resolve_weights(tmp_path)
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(RecipeError, match="do not fit the model"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(3, 2)), tmp_path / "w.pth")
