"""Two processes on the CPU: one that dies is restarted with the other by torchrun's elastic
agent (``accelerate launch --max_restarts``) and the group resumes by itself; one that stalls
makes the other stop after ``dist_timeout`` with a message, instead of hanging."""

import signal
import subprocess
import time

import psutil
import pytest

from tests.engine.runs import (
    ENV,
    free_port,
    read_records,
    run,
    tiny_recipe,
    tiny_shapes,
    train_command,
    without_timing,
)

# 8 images, 2 processes x 2 images: 2 updates per epoch, 6 in all; a checkpoint every update.
SCHEDULE = ["total_epochs=3", "checkpoint.interval_iters=1", "log_interval=1"]


def launch(*options: str) -> list[str]:
    return [
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        *options,
    ]


def worker(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The training process of ``rank`` started (through the elastic agent) by ``launcher``."""
    for child in launcher.children(recursive=True):
        try:
            if "trainer/run.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(
                rank
            ):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


def test_a_killed_process_restarts_the_group_which_resumes_and_finishes_alike(shapes, tmp_path):
    reference = tmp_path / "reference"
    run(train_command(*tiny_recipe(shapes, reference), *SCHEDULE, launch=launch()))

    work_dir = tmp_path / "work"
    work_dir.mkdir()
    command = train_command(
        *tiny_recipe(shapes, work_dir),
        *SCHEDULE,
        launch=launch("--max_restarts", "1", "--monitor_interval", "0.2"),
    )
    latest = work_dir / "checkpoints/latest"
    with open(work_dir / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        launcher = psutil.Process(process.pid)
        killed = None
        while process.poll() is None and killed is None:
            if latest.is_file() and latest.read_text() == "iter_3":
                killed = worker(launcher, rank=1)
                if killed is not None:
                    killed.send_signal(signal.SIGKILL)
            time.sleep(0.02)
        process.wait(timeout=300)
    message = (work_dir / "stderr.txt").read_text()[-3000:]
    assert killed is not None, f"the run ended before iter_3: {message}"
    assert process.returncode == 0, message

    log = (work_dir / "log.txt").read_text()
    assert "restart 1 of the process group: resume=auto" in log
    assert "resumed from" in log
    # each row once, as the uninterrupted run logged it
    expected = [without_timing(r) for r in read_records(reference)]
    assert [without_timing(r) for r in read_records(work_dir)] == expected
    assert (work_dir / "checkpoints/latest").read_text() == "epoch_3"


def test_a_stalled_process_stops_the_others_after_dist_timeout(shapes, tmp_path):
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    command = train_command(
        *tiny_recipe(shapes, work_dir),
        *SCHEDULE,
        "total_epochs=50",
        "dist_timeout=5",
        launch=launch(),
    )
    metrics = work_dir / "metrics.jsonl"
    stalled = None
    with open(work_dir / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        launcher = psutil.Process(process.pid)
        try:
            while process.poll() is None and stalled is None:
                if metrics.is_file() and metrics.read_text().count("\n") >= 2:
                    stalled = worker(launcher, rank=1)
                    if stalled is not None:
                        stalled.suspend()  # SIGSTOP: alive, but never answers
                time.sleep(0.02)
            assert stalled is not None, (work_dir / "stderr.txt").read_text()[-3000:]
            stopped_at = time.monotonic()
            first = worker(launcher, rank=0)
            first.wait(timeout=120)  # not forever
            waited = time.monotonic() - stopped_at
        finally:
            if stalled is not None and stalled.is_running():
                stalled.kill()
            process.wait(timeout=120)
    message = (work_dir / "stderr.txt").read_text()
    assert "error: process 0 stopped at iter" in message, message[-3000:]
    assert "did not answer within dist_timeout=5s" in message
    assert "resume=auto continues from it" in message
    assert 5 <= waited < 60
    assert process.returncode != 0
