"""Stop signals: a run asked to stop (SIGTERM, SIGUSR1) saves the iteration it is at, exits
with status 75, and the run continued with resume=auto logs what an uninterrupted one logs."""

import json
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
from trainer.engine.preemption import PREEMPTED_EXIT_CODE

# 8 images one at a time: 8 updates per epoch, 16 in all; a log line every 3 updates, so that
# a stop mostly falls inside a log interval, which the continued run must complete.
SCHEDULE = [
    "total_epochs=2",
    "workflow=[[train,1],[val,1]]",
    "data.imgs_per_gpu=1",
    "data.workers_per_gpu=1",
    "log_interval=3",
    "resume=auto",
]


def signal_when_logged(command: list[str], work_dir, sig: int, rows: int) -> tuple[int, str]:
    """Start a run in its own process group and send ``sig`` to the whole group (the run and
    its loader workers, as a cluster scheduler does) once metrics.jsonl has ``rows`` rows.
    Returns the exit status and stderr."""
    work_dir.mkdir(parents=True)
    metrics = work_dir / "metrics.jsonl"
    with open(work_dir / "stderr.txt", "w") as stderr:  # a file: a full pipe would block
        process = subprocess.Popen(
            command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        try:
            while process.poll() is None:
                if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
                    os.killpg(process.pid, sig)
                    break
                time.sleep(0.02)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, (work_dir / "stderr.txt").read_text()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("reference")
    run(train_command(*tiny_recipe(shapes, work_dir), *SCHEDULE))
    return read_records(work_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stopped_run_saves_its_iteration_and_continues_exactly(shapes, reference, tmp_path, sig):
    work_dir = tmp_path / "work"
    command = train_command(*tiny_recipe(shapes, work_dir), *SCHEDULE)
    status, stderr = signal_when_logged(command, work_dir, sig, rows=1)

    assert status == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"stopped: stopped by {signal.Signals(sig).name}: checkpoint iter_" in stderr
    latest = (work_dir / "checkpoints/latest").read_text()
    saved = json.loads((work_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    stopped_at = saved["iter"]
    assert latest == f"iter_{stopped_at}" and 3 <= stopped_at < 16
    logged = read_records(work_dir)
    assert max(r["iter"] for r in logged) <= stopped_at  # nothing logged after the save
    assert (
        f"{signal.Signals(sig).name}: stopped after iter {stopped_at}"
        in (work_dir / "log.txt").read_text()
    )

    run(command)  # resume=auto
    continued = read_records(work_dir)
    assert [without_timing(r) for r in continued] == [without_timing(r) for r in reference]
