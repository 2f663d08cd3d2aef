"""Determinism and exact resume, on real training runs killed with SIGKILL."""

import os
import signal
import subprocess
import time

import pytest

from tests.engine.runs import (
    ENV,
    read_records,
    run,
    tiny_recipe,
    tiny_shapes,
    train_command,
    without_timing,
)

# 8 images in batches of 2: 4 iterations per epoch; a checkpoint every 3 iterations puts
# iter_6 in the middle of epoch 2, after the val phase of epoch 1. Val also runs every 3
# iterations; losses are logged as means over 2 iterations, and at each checkpoint.
SCHEDULE = [
    "total_epochs=2",
    "workflow=[[train,1],[val,1]]",
    "checkpoint.interval_iters=3",
    "val_interval_iters=3",
    "log_interval=2",
    "resume=auto",
]


def kill_at_checkpoint(command: list[str], work_dir, name: str) -> None:
    """Start a run and SIGKILL it as soon as ``checkpoints/latest`` names ``name``."""
    latest = work_dir / "checkpoints/latest"
    work_dir.mkdir(parents=True)
    with open(work_dir / "stderr.txt", "w") as stderr:  # a file: a full pipe would block
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        while process.poll() is None:
            if latest.is_file() and latest.read_text() == name:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        process.wait()
    message = (work_dir / "stderr.txt").read_text()[-2000:]
    assert process.returncode == -signal.SIGKILL, f"run ended before {name}: {message}"


def kill_and_resume(data, work_dir, *overrides: str) -> tuple[list[dict], list[dict]]:
    """Records logged before a SIGKILL right after checkpoint iter_6, and after resuming."""
    command = train_command(*tiny_recipe(data, work_dir), *SCHEDULE, *overrides)
    kill_at_checkpoint(command, work_dir, "iter_6")
    before_kill = read_records(work_dir)
    run(command)  # resume=auto picks up iter_6
    return before_kill, read_records(work_dir)


def by_phase_and_iter(records: list[dict]) -> dict:
    """The last record of each (phase, iter): a resumed run re-logs what the killed one
    logged after its checkpoint."""
    return {(r["phase"], r["iter"]): without_timing(r) for r in records}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("reference")
    run(train_command(*tiny_recipe(shapes, work_dir), *SCHEDULE))
    return read_records(work_dir)


@pytest.fixture(scope="module")
def interrupted(shapes, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("interrupted") / "work"
    return (*kill_and_resume(shapes, work_dir), work_dir)


def test_two_runs_with_the_same_seed_log_the_same_losses(reference, interrupted):
    before_kill, _, _ = interrupted
    logged = {(r["phase"], r["iter"]) for r in before_kill}
    assert {("train", 2), ("train", 3), ("val", 3), ("train", 4), ("val", 4), ("val", 6)} <= logged
    assert [r["epoch"] for r in before_kill if r["phase"] == "val"][:3] == [1, 1, 2]
    for record, expected in zip(before_kill, reference, strict=False):
        assert without_timing(record) == without_timing(expected)


def test_a_run_killed_mid_epoch_resumes_exactly(reference, interrupted):
    _, after_resume, work_dir = interrupted
    log = (work_dir / "log.txt").read_text()
    assert "iter_6 at epoch 1, iter 6 (2 batches into the epoch)" in log
    # train and val records alike match the uninterrupted run
    assert by_phase_and_iter(after_resume) == by_phase_and_iter(reference)
    assert (work_dir / "checkpoints/latest").read_text() == "epoch_2"


@pytest.mark.slow
def test_loader_workers_change_nothing_even_across_a_resume(shapes, reference, tmp_path):
    # augmentations are seeded per sample: 2 persistent workers load what the main process
    # loads, and a worker restarted by the resume draws as the killed one would have
    _, after_resume = kill_and_resume(shapes, tmp_path / "work", "data.workers_per_gpu=2")
    assert by_phase_and_iter(after_resume) == by_phase_and_iter(reference)
