"""End-to-end smoke runs of the commands the README documents, on the demo recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A few iterations, then a val phase; few detections keep the untrained model's eval quick.
SMOKE = [
    "max_iters=3",
    "workflow=[[train,1],[val,1]]",
    "data.workers_per_gpu=0",
    "data.imgs_per_gpu=2",
    "model.roi_heads.detections_per_img=10",
]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # One thread per process: tests share two cores, and oversubscribed threads spin.
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """python trainer/run.py recipes/demo.yaml, run where the data will be generated."""
    cwd = tmp_path_factory.mktemp("demo")
    work_dir = cwd / "work"
    run(
        [
            sys.executable,
            str(ROOT / "trainer/run.py"),
            str(ROOT / "recipes/demo.yaml"),
            f"work_dir={work_dir}",
            *SMOKE,
        ],
        cwd,
    )
    return cwd, work_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_run_writes_its_work_dir(demo_run):
    cwd, work_dir = demo_run
    assert (cwd / "data/shapes/annotations/train.json").is_file()  # generated on first use
    assert "max_iters: 3" in (work_dir / "config.yaml").read_text()
    records = read_jsonl(work_dir / "metrics.jsonl")
    train = [r for r in records if r["phase"] == "train"]
    val = [r for r in records if r["phase"] == "val"]
    assert train[-1]["iter"] == 3 and "loss_mask" in train[-1] and "lr" in train[-1]
    assert len(val) == 1 and 0.0 <= val[0]["segm/AP"] <= 1.0 and "bbox/AP50" in val[0]
    # max_iters stops inside epoch 1: the checkpoint resumes from there
    assert (work_dir / "checkpoints/latest").read_text() == "iter_3"
    assert (work_dir / "checkpoints/iter_3/model.safetensors").is_file()
    assert (work_dir / "checkpoints/final/model.safetensors").is_file()
    assert "val in epoch 1 (iter 3, 100 images)" in (work_dir / "log.txt").read_text()


def test_evaluate_writes_metrics_and_coco_predictions(demo_run):
    cwd, work_dir = demo_run
    out = cwd / "eval"
    run(
        [
            sys.executable,
            "-m",
            "trainer.evaluate",
            str(ROOT / "recipes/demo.yaml"),
            "--checkpoint",
            str(work_dir),
            "--out",
            str(out),
            *SMOKE,
        ],
        cwd,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert {f"{t}/{m}" for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75")} <= set(metrics)
    predictions = json.loads((out / "predictions.json").read_text())
    val = json.loads((cwd / "data/shapes/annotations/val.json").read_text())
    image_ids = {image["id"] for image in val["images"]}
    category_ids = {category["id"] for category in val["categories"]}
    assert predictions, "an untrained model still returns some detections"
    for p in predictions[:50]:
        assert p["image_id"] in image_ids and p["category_id"] in category_ids
        assert len(p["bbox"]) == 4 and 0 <= p["score"] <= 1
        assert set(p["segmentation"]) == {"size", "counts"}
    # the val metrics of the training run equal a separate evaluation of its checkpoint
    val_record = [r for r in read_jsonl(work_dir / "metrics.jsonl") if r["phase"] == "val"][-1]
    assert metrics["segm/AP"] == pytest.approx(val_record["segm/AP"], abs=1e-6)


def test_accelerate_launch_behaves_like_python(demo_run, tmp_path):
    cwd, work_dir = demo_run
    launched = cwd / "launched"
    run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--num_processes",
            "1",
            "--cpu",
            str(ROOT / "trainer/run.py"),
            str(ROOT / "recipes/demo.yaml"),
            f"work_dir={launched}",
            *SMOKE,
        ],
        cwd,
    )
    ours = read_jsonl(launched / "metrics.jsonl")
    reference = read_jsonl(work_dir / "metrics.jsonl")
    assert [r["phase"] for r in ours] == [r["phase"] for r in reference]
    # same seed, same data order: the same losses
    assert [r.get("loss") for r in ours] == [r.get("loss") for r in reference]
