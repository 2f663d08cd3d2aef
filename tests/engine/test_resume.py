import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.data.shapes import generate_shapes

ROOT = Path(__file__).resolve().parents[2]


def test_resume_auto_continues_from_the_latest_checkpoint(tmp_path):
    data = tmp_path / "shapes"
    generate_shapes(data, num_train=8, num_val=2, image_size=64)
    common = [
        f"work_dir={tmp_path / 'work'}",
        f"data.train.ann_file={data}/annotations/train.json",
        f"data.train.img_dir={data}/train",
        f"data.val.ann_file={data}/annotations/val.json",
        f"data.val.img_dir={data}/val",
        "data.train.type=CocoDataset",
        "data.val.type=CocoDataset",
        "data.imgs_per_gpu=4",
        "data.workers_per_gpu=0",
        "workflow=[[train,1]]",
        "log_interval=1",
        "resume=auto",
    ]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))

    def train(epochs: int) -> None:
        command = [sys.executable, str(ROOT / "trainer/run.py"), str(ROOT / "recipes/demo.yaml")]
        result = subprocess.run(
            [*command, *common, f"total_epochs={epochs}"], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]

    train(1)  # nothing to resume yet: starts fresh
    train(2)  # resumes after epoch 1
    records = [
        json.loads(line) for line in (tmp_path / "work/metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["epoch"], r["iter"]) for r in records] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert (tmp_path / "work/checkpoints/latest").read_text() == "epoch_2"
    assert "resumed from" in (tmp_path / "work/log.txt").read_text()
