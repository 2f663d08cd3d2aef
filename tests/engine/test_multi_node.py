"""Two "nodes" on one machine: ``accelerate launch --config_file launch/multi_node.yaml`` with
machine ranks 0 and 1 over 127.0.0.1 (one CPU process each), started by hand and by
``launch/slurm.sh`` through stand-ins of ``srun`` and ``scontrol``. The SLURM job, told that
its time limit is near, saves its iteration and requeues itself; the requeued job continues
with the losses of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.runs import (
    ENV,
    ROOT,
    free_port,
    read_records,
    tiny_recipe,
    tiny_shapes,
    without_timing,
)

# 8 images, 2 nodes x 2 images: 2 updates per epoch; the nodes' configs ask for bf16, which
# these CPUs would only emulate.
SCHEDULE = ["total_epochs=4", "log_interval=3", "mixed_precision=no"]
ACCELERATE = Path(sys.executable).parent / "accelerate"

# srun: starts the task's command once per node (SLURM_NODEID 0..SLURM_NNODES-1), each in a
# session of its own, and passes USR1 / TERM on to every process of every task, as SLURM
# signals every process of a job step.
SRUN = f"""#!{sys.executable}
import os, signal, subprocess, sys
import psutil

args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
tasks = [
    subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(node)), start_new_session=True)
    for node in range(int(os.environ["SLURM_NNODES"]))
]

def forward(signum, frame):
    for task in tasks:
        try:
            processes = [psutil.Process(task.pid), *psutil.Process(task.pid).children(True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
sys.exit(max(task.wait() for task in tasks))
"""

SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") tr ',' '\\n' <<< "$3" ;;
  requeue*) echo "requeue $2" >> "$SCONTROL_LOG" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""


def node_command(rank: int, port: int, recipe: list[str]) -> list[str]:
    return [
        str(ACCELERATE),
        "launch",
        "--config_file",
        str(ROOT / "launch/multi_node.yaml"),
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        str(ROOT / "trainer/run.py"),
        str(ROOT / "recipes/demo.yaml"),
        *recipe,
    ]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def two_nodes(shapes, tmp_path_factory):
    """A run of two nodes started by hand; its work_dir."""
    work_dir = tmp_path_factory.mktemp("two_nodes")
    port = free_port()
    recipe = [*tiny_recipe(shapes, work_dir), *SCHEDULE]
    nodes = [
        subprocess.Popen(
            node_command(rank, port, recipe),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    return work_dir


def test_two_nodes_train_together(two_nodes):
    log = (two_nodes / "log.txt").read_text()
    assert "(2 processes, MULTI_CPU)" in log
    assert "global batch 4 (2 processes x 2 images x 1 accumulation steps)" in log
    assert log.count("epoch 1 done") == 1  # one log: node 1 writes none
    records = read_records(two_nodes)
    # 8 updates of 4 images (2 per node): log lines every 3 updates and at each epoch end
    assert [r["iter"] for r in records if r["phase"] == "train"] == [2, 3, 4, 6, 8]
    assert (two_nodes / "checkpoints/latest").read_text() == "epoch_4"
    assert (two_nodes / "checkpoints/final/model.safetensors").is_file()


def slurm_environment(tmp_path: Path, restart: int) -> dict:
    bin_dir = tmp_path / "bin"
    if not bin_dir.is_dir():
        bin_dir.mkdir()
        for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    return dict(
        ENV,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
        SLURM_NNODES="2",
        SLURM_RESTART_COUNT=str(restart),
        GPUS_PER_NODE="1",
        MAIN_PORT=str(free_port()),
        ACCELERATE=str(ACCELERATE),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )


def test_slurm_job_stops_at_the_time_limit_requeues_and_continues_alike(
    shapes, two_nodes, tmp_path
):
    work_dir = tmp_path / "work"
    command = ["bash", "launch/slurm.sh", "recipes/demo.yaml", *tiny_recipe(shapes, work_dir)]
    command += SCHEDULE
    metrics = work_dir / "metrics.jsonl"
    with open(tmp_path / "job1.txt", "w") as output:
        job = subprocess.Popen(
            command, env=slurm_environment(tmp_path, 0), cwd=ROOT, stdout=output, stderr=output
        )
        try:
            while job.poll() is None:
                if metrics.is_file() and metrics.read_text().count("\n") >= 1:
                    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends
                    break
                time.sleep(0.02)
            job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
    output = (tmp_path / "job1.txt").read_text()
    assert job.returncode == 0, output[-3000:]
    assert "time limit near" in output
    assert "stopped: stopped by SIGUSR1: checkpoint iter_" in output
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    latest = (work_dir / "checkpoints/latest").read_text()
    assert latest.startswith("iter_") and int(latest[5:]) < 8

    requeued = subprocess.run(
        command, env=slurm_environment(tmp_path, 1), cwd=ROOT, capture_output=True, text=True
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "continuing from the latest checkpoint" in requeued.stdout
    assert f"resumed from {work_dir}/checkpoints/{latest}" in (work_dir / "log.txt").read_text()
    assert [without_timing(r) for r in read_records(work_dir)] == [
        without_timing(r) for r in read_records(two_nodes)
    ]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not again
