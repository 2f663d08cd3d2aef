"""The training step on a toy model: accumulation, clipping, EMA, the non-finite guard."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.toy import ToyDataset, read_records, toy_model, train_toy
from trainer.engine import NonFiniteLossError
from trainer.engine.checkpoint import latest_checkpoint


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[key].flatten() for key in sorted(state)])


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_two_accumulated_batches_make_the_update_of_one_double_batch(tmp_path):
    data = ToyDataset(n=8)
    single = toy_model()
    train_toy(tmp_path / "a", single, data, "data.imgs_per_gpu=2", "optimizer.base_batch_size=2")
    accumulated = toy_model()
    records = train_toy(
        tmp_path / "b",
        accumulated,
        data,
        "data.imgs_per_gpu=1",
        "optimizer.accumulation_steps=2",
        "optimizer.base_batch_size=2",
    )
    # 8 images in batches of 1, two per update: 4 updates, as with batches of 2
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    for name, value in single.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value)
    # the untrained model differs, so the comparison above is not vacuous
    assert not torch.allclose(flat(toy_model().state_dict()), flat(single.state_dict()))


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    model = toy_model()
    before = flat(model.state_dict())
    train_toy(tmp_path, model, ToyDataset(), "max_iters=1", "optimizer.grad_clip=0.001")
    # SGD's first step is lr x gradient, and the clipped gradient has norm 0.001
    step = flat(model.state_dict()) - before
    assert step.norm().item() == pytest.approx(0.1 * 0.001, rel=1e-4)


def test_ema_weights_follow_the_model_and_are_the_evaluated_ones(tmp_path):
    model = toy_model()
    train_toy(
        tmp_path,
        model,
        ToyDataset(n=2),
        "ema.enabled=true",
        "ema.warmup=false",
        "ema.decay=0.75",
        "checkpoint.interval_iters=1",
        "checkpoint.keep_last=0",
    )
    root = tmp_path / "checkpoints"
    first, second = weights(root / "iter_1"), weights(root / "epoch_1")
    ema = load_file(str(root / "epoch_1/ema.safetensors"))
    # timm's ModelEmaV3 copies the model at the first update, then averages
    for name, value in ema.items():
        torch.testing.assert_close(value, 0.75 * first[name] + 0.25 * second[name])
    final = weights(root / "final")
    for name, value in ema.items():
        torch.testing.assert_close(final[name], value)


def test_a_non_finite_loss_skips_its_update_with_a_warning(tmp_path):
    records = train_toy(
        tmp_path,
        toy_model(),
        ToyDataset(n=4, nan_at=(2,)),
        "checkpoint.interval_iters=1",
        "checkpoint.keep_last=0",
    )
    bad = [r["iter"] for r in records if r["loss"] is None]
    assert len(records) == 4 and len(bad) == 1
    log = (tmp_path / "log.txt").read_text()
    assert log.count("non-finite loss at iter") == 1
    root = tmp_path / "checkpoints"
    if bad[0] > 1:  # the skipped update left the weights as the previous one did
        skipped, previous = weights(root / f"iter_{bad[0]}"), weights(root / f"iter_{bad[0] - 1}")
        torch.testing.assert_close(flat(skipped), flat(previous))
    assert all(math.isfinite(r["loss"]) for r in records if r["loss"] is not None)
    assert torch.isfinite(flat(weights(root / "final"))).all()


def test_repeated_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    model = toy_model()
    train_toy(tmp_path, model, ToyDataset(n=4))
    good = latest_checkpoint(tmp_path)
    saved = weights(good)
    with pytest.raises(NonFiniteLossError, match="3 updates in a row.*epoch_1, is intact"):
        train_toy(
            tmp_path,
            model,
            ToyDataset(n=4, nan_at=(0, 1, 2, 3)),
            "total_epochs=2",
            "resume=auto",
            "max_nonfinite_steps=3",
        )
    assert latest_checkpoint(tmp_path) == good
    torch.testing.assert_close(flat(weights(good)), flat(saved))
    assert [r["iter"] for r in read_records(tmp_path) if r["epoch"] == 2] == [5, 6]
    assert "non-finite loss at iter 7" in (tmp_path / "log.txt").read_text()


def test_a_resumed_run_ends_with_the_weights_and_ema_of_an_uninterrupted_one(tmp_path):
    recipe = [
        "total_epochs=2",
        "optimizer.lr=0.01",
        "ema.enabled=true",
        "ema.decay=0.5",
        "ema.warmup=false",
    ]
    whole = toy_model()
    train_toy(tmp_path / "whole", whole, ToyDataset(n=4), *recipe)
    train_toy(tmp_path / "parts", toy_model(), ToyDataset(n=4), *recipe, "max_iters=4")
    resumed = toy_model()
    train_toy(tmp_path / "parts", resumed, ToyDataset(n=4), *recipe, "resume=auto")
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    ema_whole = load_file(str(tmp_path / "whole/checkpoints/epoch_2/ema.safetensors"))
    ema_parts = load_file(str(tmp_path / "parts/checkpoints/epoch_2/ema.safetensors"))
    for name, value in ema_whole.items():
        torch.testing.assert_close(ema_parts[name], value, rtol=0, atol=0)


def test_a_resume_takes_the_learning_rate_of_the_recipe_not_the_checkpoint(tmp_path):
    train_toy(tmp_path, toy_model(), ToyDataset(n=2))
    records = train_toy(
        tmp_path, toy_model(), ToyDataset(n=2), "total_epochs=2", "resume=auto", "optimizer.lr=0.02"
    )
    assert [(r["epoch"], r["lr"]) for r in records] == [(1, 0.1), (1, 0.1), (2, 0.02), (2, 0.02)]
