"""Honest logs: a reused work_dir says so and starts a fresh metrics.jsonl (the earlier one
kept under another name), and a resumed run never leaves two rows of one iteration."""

import json
import os
import signal
import subprocess
import time

from tests.engine.runs import ENV, run, tiny_recipe, tiny_shapes, train_command
from tests.engine.toy import ToyDataset, read_records, toy_model, train_toy
from trainer.engine.logging import rewind_metrics


def test_a_reused_work_dir_says_so_and_keeps_the_earlier_metrics(tmp_path):
    first = train_toy(tmp_path, toy_model(), ToyDataset(n=4))
    second = train_toy(tmp_path, toy_model(), ToyDataset(n=2))

    assert [r["iter"] for r in first] == [1, 2, 3, 4]
    assert [r["iter"] for r in second] == [1, 2]  # metrics.jsonl holds this run only
    (kept,) = tmp_path.glob("metrics.2*.jsonl")
    assert [json.loads(line) for line in kept.read_text().splitlines()] == first
    warning = (
        f"WARNING work_dir {tmp_path} holds an earlier run (checkpoints epoch_1; its "
        f"metrics.jsonl is now {kept.name}) and resume is not set: starting fresh; checkpoints "
        "of the same name will be saved over (resume=auto would continue it)"
    )
    assert warning in (tmp_path / "log.txt").read_text()


def test_resume_auto_without_a_checkpoint_starts_a_fresh_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"phase": "train", "epoch": 1, "iter": 1}\n')
    records = train_toy(tmp_path, toy_model(), ToyDataset(n=2), "resume=auto")
    assert [r["iter"] for r in records] == [1, 2]
    (kept,) = tmp_path.glob("metrics.2*.jsonl")
    assert "starting fresh: the earlier metrics.jsonl is now" in (tmp_path / "log.txt").read_text()
    assert kept.read_text() == '{"phase": "train", "epoch": 1, "iter": 1}\n'


def test_a_finished_run_resumed_again_keeps_every_row(tmp_path):
    # nothing is left to train: the rows after the last checkpoint are not logged again, so
    # they stay
    train_toy(tmp_path, toy_model(), ToyDataset(n=4))
    before = (tmp_path / "metrics.jsonl").read_text()
    train_toy(tmp_path, toy_model(), ToyDataset(n=4), "resume=auto")
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not list(tmp_path.glob("metrics.*.jsonl"))


def test_rows_after_the_checkpoint_and_a_line_cut_by_a_kill_are_set_aside(tmp_path):
    rows = [{"phase": "train", "iter": i, "loss": 1.0} for i in (1, 2, 3)]
    lines = [json.dumps(row) + "\n" for row in rows]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(lines) + '{"phase": "train", "it')

    side = rewind_metrics(path, iteration=2, rows=2)

    assert path.read_text() == "".join(lines[:2])
    assert side.name.startswith("metrics.after_iter_2.")
    assert side.read_text() == lines[2] + '{"phase": "train", "it'


# 8 images in batches of 2: 4 updates per epoch, 8 in all; a checkpoint every 3 updates.
SCHEDULE = [
    "total_epochs=2",
    "workflow=[[train,1]]",
    "checkpoint.interval_iters=3",
    "log_interval=1",
    "resume=auto",
]


def kill_after_a_row_past_the_checkpoint(command: list[str], work_dir) -> list[dict]:
    """Start a run and SIGKILL it once it has logged iteration 4 (after checkpoint iter_3,
    before iter_6); returns the rows logged by then."""
    work_dir.mkdir(parents=True)
    metrics, latest = work_dir / "metrics.jsonl", work_dir / "checkpoints/latest"
    with open(work_dir / "stderr.txt", "w") as stderr:  # a file: a full pipe would block
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            while process.poll() is None:
                if metrics.is_file() and '"iter": 4,' in metrics.read_text():
                    os.kill(process.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            process.wait()
    assert process.returncode == -signal.SIGKILL, (work_dir / "stderr.txt").read_text()[-3000:]
    assert latest.read_text() == "iter_3"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_a_run_killed_after_logging_past_its_checkpoint_resumes_without_duplicates(tmp_path):
    data = tiny_shapes(tmp_path / "shapes")
    work_dir = tmp_path / "work"
    command = train_command(*tiny_recipe(data, work_dir), *SCHEDULE)
    killed = kill_after_a_row_past_the_checkpoint(command, work_dir)
    assert [r["iter"] for r in killed][:4] == [1, 2, 3, 4]

    run(command)  # resume=auto from iter_3

    records = read_records(work_dir)
    assert [r["iter"] for r in records] == list(range(1, 9))  # each iteration once
    assert records[:3] == killed[:3]  # logged before the checkpoint: kept as they were
    (side,) = work_dir.glob("metrics.after_iter_3.*.jsonl")
    assert [json.loads(line) for line in side.read_text().splitlines()] == killed[3:]
    assert f"moved to {side.name}" in (work_dir / "log.txt").read_text()
