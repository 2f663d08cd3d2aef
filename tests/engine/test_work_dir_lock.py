"""One run per work_dir: a second run stops at once with the holder named; a lock left by a
killed run is taken over; a read-only or too small work_dir stops the run before training."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine.runs import ENV, free_port, tiny_recipe, tiny_shapes, train_command
from tests.engine.toy import ToyDataset, toy_model, train_toy
from trainer.engine import NonFiniteLossError
from trainer.engine.checkpoint import WorkDirError
from trainer.engine.work_dir_lock import LOCK_FILE

# A process that takes the lock of the work_dir in argv[1] and holds it until killed; with
# argv[2] == "fork", it first starts a child that outlives it, as loader workers can.
HOLDER = """
import os, sys, time
from trainer.engine.work_dir_lock import WorkDirLock
WorkDirLock(sys.argv[1]).acquire()
if sys.argv[2:] == ["fork"] and os.fork() == 0:
    os.setsid()
    print("child", os.getpid(), flush=True)
    time.sleep(600)
    os._exit(0)
time.sleep(0.1)
print("held", flush=True)
time.sleep(600)
"""

# Tries to take the lock of argv[1] once; prints "taken" or the error.
TRY = """
import sys
from trainer.engine.work_dir_lock import WorkDirLock
try:
    WorkDirLock(sys.argv[1]).acquire()
    print("taken")
except Exception as exc:
    print(exc)
"""


def start_holder(work_dir: Path, *args: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(work_dir), *args],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    return holder


def held(holder: subprocess.Popen) -> subprocess.Popen:
    assert holder.stdout.readline().strip() == "held"
    return holder


def try_lock(work_dir: Path) -> str:
    command = [sys.executable, "-c", TRY, str(work_dir)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/"work"."""
    process = held(start_holder(tmp_path / "work"))
    yield process
    process.kill()
    process.wait()


def test_a_second_run_on_a_held_work_dir_stops_before_training(tmp_path, holder):
    work_dir = tmp_path / "work"
    with pytest.raises(WorkDirError) as raised:
        train_toy(work_dir, toy_model(), ToyDataset(n=4))
    message = str(raised.value)
    assert message.startswith(f"work_dir '{work_dir}' is in use by another training run (pid ")
    assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
    assert "\n" not in message
    assert not (work_dir / "metrics.jsonl").exists()
    assert not (work_dir / "checkpoints").exists()  # nothing trained, nothing saved


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    work_dir = tmp_path / "work"
    killed = held(start_holder(work_dir))
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert json.loads((work_dir / LOCK_FILE).read_text())["pid"] == killed.pid  # left behind

    records = train_toy(work_dir, toy_model(), ToyDataset(n=4))

    assert len(records) == 4
    log = (work_dir / "log.txt").read_text()
    assert (
        f"lock left by a run that ended without releasing it (pid {killed.pid} on host "
        f"{socket.gethostname()}" in log
    )
    assert "taking it over" in log
    assert (work_dir / LOCK_FILE).read_text() == ""  # released at the end of the run


def test_the_command_logs_the_taking_over_in_its_log(tmp_path):
    """trainer/run.py takes the lock before its log exists: the warning still reaches
    log.txt (the run then stops on its missing annotation file, after the logger is set)."""
    work_dir = tmp_path / "work"
    killed = held(start_holder(work_dir))
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    data = tmp_path / "missing"
    command = train_command(*tiny_recipe(data, work_dir))
    result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    log = (work_dir / "log.txt").read_text()
    assert f"lock left by a run that ended without releasing it (pid {killed.pid} " in log
    assert log.count("taking it over") == 1
    assert (work_dir / LOCK_FILE).read_text() == ""


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    work_dir = tmp_path / "work"
    with pytest.raises(NonFiniteLossError):
        train_toy(work_dir, toy_model(), ToyDataset(n=4, nan_at=(0,)), "max_nonfinite_steps=1")
    assert try_lock(work_dir) == "taken"  # by another process, now


def test_a_run_holding_its_work_dir_can_call_train_detector_on_it(tmp_path):
    # A command may hold the work_dir around train_detector: that is no second run.
    from accelerate import Accelerator

    from trainer.engine.work_dir_lock import hold_work_dir

    work_dir = tmp_path / "work"
    with hold_work_dir(Accelerator(cpu=True), work_dir):
        assert len(train_toy(work_dir, toy_model(), ToyDataset(n=2))) == 2
        assert f"in use by another training run (pid {os.getpid()} " in try_lock(work_dir)
    assert try_lock(work_dir) == "taken"


def test_processes_forked_by_a_killed_run_do_not_keep_its_work_dir(tmp_path):
    work_dir = tmp_path / "work"
    killed = start_holder(work_dir, "fork")
    child = int(killed.stdout.readline().split()[1])
    held(killed)
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        os.kill(child, 0)  # the child still runs, with the lock file open
        assert try_lock(work_dir) == "taken"
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_command_prints_one_line_naming_the_running_process(tmp_path, holder):
    data = tiny_shapes(tmp_path / "shapes")
    command = train_command(*tiny_recipe(data, tmp_path / "work"), "total_epochs=1")
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: work_dir '{tmp_path / 'work'}' is in use by another training")
    assert f"pid {holder.pid} on host {socket.gethostname()}" in line


def test_every_process_of_a_second_distributed_run_stops(tmp_path, holder):
    data = tiny_shapes(tmp_path / "shapes")
    launch = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    command = train_command(*tiny_recipe(data, tmp_path / "work"), "total_epochs=1", launch=launch)
    # Only the main process holds the lock; the other learns its verdict instead of waiting
    # for it in the first collective.
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("error: work_dir") == 1  # printed once
    assert f"pid {holder.pid}" in result.stderr


def read_only(folder: Path) -> bool:
    """Make ``folder`` read-only to this process: chmod for a user, the immutable attribute
    for root (whom permissions do not stop). False when neither is possible here."""
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def writable(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_work_dir_is_one_line_before_anything_is_built(tmp_path):
    data = tiny_shapes(tmp_path / "shapes")
    work_dir = tmp_path / "work"
    if not read_only(work_dir):
        pytest.skip("no way to make a folder read-only here")
    try:
        command = train_command(*tiny_recipe(data, work_dir), "total_epochs=1")
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
        with pytest.raises(WorkDirError, match=f"work_dir '{work_dir}' is not writable"):
            train_toy(tmp_path / "elsewhere", toy_model(), ToyDataset(n=2), f"work_dir={work_dir}")
    finally:
        writable(work_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: work_dir '{work_dir}' is not writable (" in result.stderr
    assert list(work_dir.iterdir()) == []


def test_too_little_disk_for_a_checkpoint_stops_before_training(tmp_path):
    model = toy_model()
    # 2**40 float32 parameters on the meta device: a 4 TiB model, with no memory behind it
    model.huge = torch.nn.Parameter(torch.empty(2**40, device="meta"), requires_grad=False)
    with pytest.raises(WorkDirError) as raised:
        train_toy(tmp_path, model, ToyDataset(n=2))
    message = str(raised.value)
    assert message.startswith(f"not enough free disk space in '{tmp_path / 'checkpoints'}': ")
    assert "about 8192.0 GiB needed (a checkpoint 4096.0 GiB, exported weights 4096.0 GiB)" in (
        message
    )
    assert " GiB free; free space or choose another work_dir." in message
    assert not (tmp_path / "metrics.jsonl").exists()
