"""Two real processes on the CPU (gloo), started by ``accelerate launch --multi_gpu``."""

import json
import subprocess

import pytest

from tests.engine.runs import (
    ENV,
    evaluate_command,
    read_records,
    run,
    tiny_recipe,
    tiny_shapes,
    train_command,
)


def test_two_processes_train_together_and_evaluate_like_one(tmp_path):
    # 5 val images over 2 processes x 2 images: the last batches are padded with repeats
    data = tiny_shapes(tmp_path / "shapes", num_val=5)
    work_dir = tmp_path / "work"
    recipe = [*tiny_recipe(data, work_dir), "total_epochs=1", "workflow=[[train,1],[val,1]]"]
    launch = ["--multi_gpu", "--num_processes", "2"]
    launched = run(
        train_command(
            *recipe,
            "trackers=[wandb]",
            "log_images=2",
            "ddp.find_unused_parameters=true",
            launch=launch,
        )
    )

    # both ranks joined one process group: one random state each, different streams
    state = json.loads((work_dir / "checkpoints/epoch_1/trainer_state.json").read_text())
    assert state["num_processes"] == 2 and len(set(state["rng"])) == 2
    log = (work_dir / "log.txt").read_text()
    assert "(2 processes, MULTI_CPU)" in log
    assert "global batch 4 (2 processes x 2 images x 1 accumulation steps)" in log
    assert "DDP: find_unused_parameters=True" in log  # the recipe's DDP option reached DDP
    # one clean log: the other process prints nothing of its own
    assert launched.stdout.count("train set: 8 images") == 1
    assert log.count("epoch 1 done") == 1
    # W&B (offline) runs on the main process only and got val images with predictions drawn
    (wandb_run,) = (work_dir / "wandb").glob("offline-run-*")
    assert len(list(wandb_run.glob("files/media/images/val/predictions_*.png"))) == 2

    records = read_records(work_dir)
    assert [r["iter"] for r in records if r["phase"] == "train"] == [1, 2]  # 8 images / 4
    (val,) = [r for r in records if r["phase"] == "val"]
    assert val["images"] == 5  # none lost, the padding repeats dropped

    # a single-process evaluation of the same checkpoint sees the same detections and metrics
    out = tmp_path / "eval"
    run(evaluate_command("--checkpoint", str(work_dir), "--out", str(out), *recipe))
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    val_images = json.loads((data / "annotations/val.json").read_text())["images"]
    assert {p["image_id"] for p in predictions} == {image["id"] for image in val_images}
    assert val["detections"] == len(predictions) > 0
    for name, value in metrics.items():
        assert val[name] == pytest.approx(value, abs=1e-9), name

    # and so does an evaluation shared by two processes (each scoring half the images)
    shared = tmp_path / "eval_shared"
    run(
        evaluate_command(
            "--checkpoint", str(work_dir), "--out", str(shared), *recipe, launch=launch
        )
    )
    assert "(5 images), 2 processes" in (shared / "log.txt").read_text()
    assert json.loads((shared / "metrics.json").read_text()) == pytest.approx(metrics, abs=1e-9)
    assert len(json.loads((shared / "predictions.json").read_text())) == len(predictions)


def test_sync_bn_on_cpu_processes_is_a_clear_recipe_error(tmp_path):
    data = tiny_shapes(tmp_path / "shapes")
    recipe = [*tiny_recipe(data, tmp_path / "work"), "model.backbone.frozen_bn=false"]
    command = train_command(
        *recipe, "model.backbone.sync_bn=true", launch=["--multi_gpu", "--num_processes", "2"]
    )
    result = subprocess.run(command, env=ENV, capture_output=True, text=True)
    # each process stops with exit status 2 before training; the launcher then fails too
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("error: model.backbone.sync_bn: torch's SyncBatchNorm") == 1
