"""Real training runs of ``trainer/run.py`` in subprocesses, on a tiny generated shapes set
and a tiny timm backbone, so that each run takes seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.data.shapes import generate_shapes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# One thread per process: test runs share two cores with each other (and with other tests),
# and oversubscribed OpenMP threads spin instead of working.
ENV = dict(
    os.environ,
    WANDB_MODE="offline",
    WANDB_SILENT="true",
    PYTHONPATH=str(ROOT),
    OMP_NUM_THREADS="1",
)


def tiny_shapes(root: Path, num_val: int = 4) -> Path:
    generate_shapes(root, num_train=8, num_val=num_val, image_size=64)
    return root


def tiny_recipe(data: Path, work_dir: Path) -> list[str]:
    """Overrides of recipes/demo.yaml: the tiny set at its own size, timm's 0.4M-parameter
    test_resnet, and few proposals and detections."""
    return [
        f"work_dir={work_dir}",
        *(f"data.{split}.type=CocoDataset" for split in ("train", "val")),
        f"data.train.ann_file={data}/annotations/train.json",
        f"data.train.img_dir={data}/train",
        f"data.val.ann_file={data}/annotations/val.json",
        f"data.val.img_dir={data}/val",
        "data.train.min_size=[64]",
        "data.val.min_size=[64]",
        "data.imgs_per_gpu=2",
        "data.workers_per_gpu=0",
        "model.backbone.name=test_resnet",
        "model.rpn.pre_nms_top_n_train=200",
        "model.rpn.post_nms_top_n_train=100",
        "model.rpn.pre_nms_top_n_test=100",
        "model.rpn.post_nms_top_n_test=50",
        "model.roi_heads.batch_size_per_image=32",
        "model.roi_heads.detections_per_img=10",
        "lr_schedule.warmup_iters=2",
        "log_interval=1",
    ]


def train_command(*overrides: str, launch: list[str] | None = None) -> list[str]:
    """``python trainer/run.py recipes/demo.yaml ...``, or through ``accelerate launch``."""
    prefix = [str(BIN / "accelerate"), "launch", *launch] if launch else [sys.executable]
    return [*prefix, str(ROOT / "trainer/run.py"), str(ROOT / "recipes/demo.yaml"), *overrides]


def evaluate_command(*args: str, launch: list[str] | None = None) -> list[str]:
    """``python -m trainer.evaluate recipes/demo.yaml ...``, or through ``accelerate launch``."""
    prefix = [str(BIN / "accelerate"), "launch", *launch] if launch else [sys.executable]
    return [*prefix, "-m", "trainer.evaluate", str(ROOT / "recipes/demo.yaml"), *args]


def run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_records(work_dir: Path) -> list[dict]:
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time_per_iter"}


def free_port() -> int:
    """A TCP port free now on 127.0.0.1, for a process group's rendezvous (tests running at
    the same time must not share one)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
