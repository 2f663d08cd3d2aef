"""Checkpoints that cannot be lost: flushed before they are renamed into place, never deleted
before their replacement is in place, a broken ``latest`` passed over for the newest complete
checkpoint, and a save that fails (a full disk) leaving the last good checkpoint in use."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tests.engine.runs import ENV, tiny_recipe, tiny_shapes, train_command
from tests.engine.toy import ToyDataset, read_records, toy_model, train_toy
from trainer.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_trainer_state,
    remove_partial_checkpoints,
    save_checkpoint,
)

# 4 toy images one at a time: 4 updates per epoch; a checkpoint every 2 updates keeps
# iter_2, epoch_1 (iter 4), iter_6 and epoch_2 (iter 8).
SCHEDULE = [
    "total_epochs=2",
    "checkpoint.interval_iters=2",
    "checkpoint.keep_last=0",
    "optimizer.lr=0.01",
]


def trained(work_dir: Path) -> Path:
    train_toy(work_dir, toy_model(), ToyDataset(n=4), *SCHEDULE)
    return work_dir / "checkpoints"


def resumed(work_dir: Path) -> list[dict]:
    """Continue to a third epoch with resume=auto; the records of metrics.jsonl."""
    return train_toy(
        work_dir, toy_model(), ToyDataset(n=4), *SCHEDULE, "total_epochs=3", "resume=auto"
    )


def test_resume_auto_passes_over_a_latest_that_names_a_folder_that_is_gone(tmp_path):
    root = trained(tmp_path)
    shutil.rmtree(root / "epoch_2")

    records = resumed(tmp_path)

    log = (tmp_path / "log.txt").read_text()
    assert (
        "resume=auto: checkpoints/latest names 'epoch_2', but epoch_2 does not exist; "
        f"resuming from {root / 'iter_6'}, the newest complete one" in log
    )
    assert "resumed from" in log and "at epoch 1, iter 6" in log
    # iterations 7 and 8, logged before the lost checkpoint, are logged once, by the resumed run
    assert [r["iter"] for r in records] == list(range(1, 13))
    assert {p.name for p in root.iterdir()} >= {"iter_2", "epoch_1", "iter_6", "epoch_3"}


def test_resume_auto_passes_over_a_checkpoint_with_a_truncated_file(tmp_path):
    root = trained(tmp_path)
    optimizer = root / "epoch_2/optimizer.bin"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as f:
        f.truncate(size // 2)

    resumed(tmp_path)

    assert (
        f"resume=auto: checkpoints/latest names 'epoch_2', but epoch_2/optimizer.bin has "
        f"{size // 2} bytes, {size} were saved; resuming from {root / 'iter_6'}"
        in (tmp_path / "log.txt").read_text()
    )


def test_resume_auto_without_latest_takes_the_newest_complete_checkpoint(tmp_path):
    root = trained(tmp_path)
    (root / "latest").unlink()
    resumed(tmp_path)
    assert (
        f"resume=auto: checkpoints/latest is missing; resuming from {root / 'epoch_2'}"
        in (tmp_path / "log.txt").read_text()
    )


def test_resuming_from_an_incomplete_folder_is_a_clear_error(tmp_path):
    root = trained(tmp_path)
    (root / "iter_6/model.safetensors").unlink()
    with pytest.raises(CheckpointError) as raised:
        train_toy(tmp_path, toy_model(), ToyDataset(n=4), f"resume={root / 'iter_6'}")
    assert str(raised.value) == (
        f"checkpoint '{root / 'iter_6'}' is incomplete: iter_6/model.safetensors is missing; "
        "resume from another folder under <work_dir>/checkpoints, or resume=auto (the newest "
        "complete one)."
    )


def test_cleaning_up_after_a_killed_save_deletes_only_what_is_provably_incomplete(tmp_path):
    root = trained(tmp_path)
    # a save killed before its last file: incomplete
    shutil.copytree(root / "iter_2", root / ".iter_10.tmp")
    (root / ".iter_10.tmp/trainer_state.json").unlink()
    # killed after its last file, before the rename: complete, left as it is
    shutil.copytree(root / "iter_2", root / ".iter_12.tmp")
    # killed while replacing iter_6: the old folder renamed aside, the new one not in place
    os.rename(root / "iter_6", root / ".iter_6.old")
    # killed while replacing epoch_1, after the new one was in place
    shutil.copytree(root / "epoch_1", root / ".epoch_1.old")

    assert latest_checkpoint(tmp_path) == root / "epoch_2"
    remove_partial_checkpoints(tmp_path)

    assert not (root / ".iter_10.tmp").exists()
    assert (root / ".iter_12.tmp/model.safetensors").is_file()
    assert load_trainer_state(root / "iter_6")["iter"] == 6  # put back
    assert not (root / ".epoch_1.old").exists() and (root / "epoch_1").is_dir()


def prepared():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator


def test_keep_last_deletes_by_save_time_so_a_fresh_run_keeps_its_own(tmp_path):
    accelerator = prepared()
    for i in (10, 20):  # an earlier run in this work_dir got further
        save_checkpoint(accelerator, tmp_path, f"iter_{i}", {"epoch": 0, "iter": i})
    for i in (2, 4):
        save_checkpoint(accelerator, tmp_path, f"iter_{i}", {"epoch": 0, "iter": i}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["iter_2", "iter_4"]


# Saves iter_1 twice into argv[1]: the second save replaces a folder.
SAVE_TWICE = """
import sys
import torch
from accelerate import Accelerator
from trainer.engine.checkpoint import save_checkpoint
accelerator = Accelerator(cpu=True)
model, optimizer = accelerator.prepare(
    torch.nn.Linear(3, 2), torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
)
for _ in range(2):
    save_checkpoint(accelerator, sys.argv[1], "iter_1", {"epoch": 0, "iter": 1},
                    model_files={"config.yaml": "seed: 0\\n"})
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_files_are_flushed_before_the_rename_and_the_old_folder_outlives_it(tmp_path):
    trace = tmp_path / "trace.txt"
    work_dir = tmp_path / "work"
    command = [sys.executable, "-c", SAVE_TWICE, str(work_dir)]
    syscalls = "fsync,rename,renameat,renameat2,unlink,unlinkat,rmdir"
    result = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-e", f"trace={syscalls}", "-o", str(trace), *command],
        env=ENV,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip("strace cannot trace here")
    assert result.returncode == 0, result.stderr[-3000:]
    root = work_dir / "checkpoints"
    events = [line for line in trace.read_text().splitlines() if str(root) in line]
    pointed = [i for i, e in enumerate(events) if f'"{root}/latest.tmp", "{root}/latest"' in e]
    assert len(pointed) == 2
    events = events[pointed[0] + 1 :]  # the second save, which replaces iter_1

    def index(text: str, after: int = -1) -> int:
        """Where ``text`` first comes in the trace after the event ``after``."""
        found = [i for i, event in enumerate(events) if text in event and i > after]
        assert found, text
        return found[0]

    def flushed(path: Path, after: int = -1) -> int:
        return index(f"<{path}>) = 0", after)

    in_place = index(f'"{root}/.iter_1.tmp", "{root}/iter_1"')
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "config.yaml"):
        assert flushed(root / ".iter_1.tmp" / name) < in_place, name
    assert flushed(root / ".iter_1.tmp") < in_place  # the folder's entries
    assert flushed(root, in_place) < index("latest.tmp", in_place)  # the rename itself
    # the old folder is renamed aside, and emptied only once the new one is in place
    assert index(f'"{root}/iter_1", "{root}/.iter_1.old"') < in_place
    before = [event for event in events[:in_place] if "rename" not in event]
    assert not any(f"{root}/iter_1" in event for event in before)
    assert in_place < index(f'rmdir("{root}/.iter_1.old")')
    assert flushed(root / "latest.tmp") < index(f'"{root}/latest.tmp", "{root}/latest"')


# ------------------------------------------------------------------- a save that fails
# 8 shapes images in batches of 2: 4 updates; iter_2 is saved, then epoch_1 (iter 4) fails.
FAILING = ["total_epochs=1", "workflow=[[train,1]]", "checkpoint.interval_iters=2"]


def tmpfs_available() -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def assert_failed_save_kept_iter_2(result, work_dir: Path, cause: str, saved_in: Path) -> None:
    """One line naming the folder (``saved_in``), the free space and the cause; iter_2
    complete behind latest in ``work_dir``."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(
        f"error: could not save checkpoint epoch_1 in '{saved_in / 'checkpoints'}': "
    ), line
    assert " MiB free" in line and cause in line, line
    assert line.endswith(
        "(the last complete one, iter_2, is intact); free space or fix the folder, then "
        "resume=auto."
    ), line
    root = work_dir / "checkpoints"
    assert (root / "latest").read_text() == "iter_2"
    state = load_trainer_state(root / "iter_2")
    for name, size in state["files"].items():
        assert (root / "iter_2" / name).stat().st_size == size
    assert not list(root.glob(".*"))  # the failed attempt is gone: its space is free again


@pytest.mark.skipif(
    shutil.which("unshare") is None or not tmpfs_available(),
    reason="needs a private mount namespace to mount a small tmpfs (root)",
)
def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_resume_continues(tmp_path):
    data = tiny_shapes(tmp_path / "shapes")
    work_dir, copy = tmp_path / "work", tmp_path / "copy"
    work_dir.mkdir()
    command = train_command(*tiny_recipe(data, work_dir), *FAILING)
    resume = train_command(*tiny_recipe(data, work_dir), *FAILING, "resume=auto")
    quoted = " ".join(f"'{part}'" for part in command)
    # 22 MiB: room for the run's check (a 12 MB checkpoint and 6 MB of weights) and for
    # iter_2, not for epoch_1 beside it. Then the disk grows, and resume=auto continues.
    script = f"""
mount -t tmpfs -o size=22m tmpfs {work_dir} || exit 99
{quoted} 2> {tmp_path}/failed.txt
echo $? > {tmp_path}/status.txt
cp -a {work_dir} {copy}
mount -o remount,size=64m {work_dir}
{" ".join(f"'{part}'" for part in resume)} > /dev/null 2> {tmp_path}/resumed.txt || exit 98
cp -a {work_dir}/. {tmp_path}/after
"""
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], env=ENV, timeout=600)
    assert result.returncode == 0, (tmp_path / "resumed.txt").read_text()[-3000:]

    failed = subprocess.CompletedProcess(
        [], int((tmp_path / "status.txt").read_text()), "", (tmp_path / "failed.txt").read_text()
    )
    # torch.save says "unexpected pos", safetensors "No space left on device": which file
    # meets the full disk first varies; the message says it plainly either way.
    assert_failed_save_kept_iter_2(failed, copy, "", work_dir)
    assert "': the disk is full (0.0 MiB free; " in failed.stderr or (
        "': the disk is full (0.1 MiB free; " in failed.stderr
    )
    after = tmp_path / "after"
    log = (after / "log.txt").read_text()
    assert f"resumed from {work_dir / 'checkpoints/iter_2'} at epoch 0, iter 2 (2 batches" in log
    assert (after / "checkpoints/latest").read_text() == "epoch_1"
    assert [r["iter"] for r in read_records(after) if r["phase"] == "train"] == [1, 2, 3, 4]


def limit_file_size() -> None:
    """In the child: files may not grow past 1 MB, and a write past it fails (EFBIG) instead
    of killing the process. Needs no privileges, unlike a small file system."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_failing_write_during_a_save_keeps_the_last_checkpoint(tmp_path):
    data = tiny_shapes(tmp_path / "shapes")
    work_dir = tmp_path / "work"
    first = train_command(*tiny_recipe(data, work_dir), *FAILING, "max_iters=2")
    subprocess.run(first, env=ENV, capture_output=True, check=True)
    assert (work_dir / "checkpoints/latest").read_text() == "iter_2"

    second = train_command(*tiny_recipe(data, work_dir), *FAILING, "resume=auto")
    result = subprocess.run(
        second, env=ENV, capture_output=True, text=True, preexec_fn=limit_file_size
    )
    assert_failed_save_kept_iter_2(result, work_dir, "File too large", work_dir)
    assert json.loads((work_dir / "checkpoints/final/info.json").read_text())["iter"] == 2
