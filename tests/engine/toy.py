"""A toy regression model with the detector's training contract, and helpers that run the
real engine on it in this process."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer.config import load_recipe
from trainer.engine import build_accelerator, train_detector
from trainer.engine.logging import setup_logger

ROOT = Path(__file__).resolve().parents[2]


class ToyDataset(Dataset):
    """``n`` random [3, 2, 2] images with a scalar regression target ``value``; the images at
    ``nan_at`` are NaN."""

    CLASSES = ("thing",)

    def __init__(self, n: int = 8, nan_at: tuple[int, ...] = ()):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 2, 2, generator=generator)
        self.values = torch.randn(n, generator=generator)
        self.nan_at = set(nan_at)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].clone()
        if index in self.nan_at:
            image.fill_(float("nan"))
        return image, {"value": self.values[index], "image_id": index}


class ToyDetector(nn.Module):
    """forward(images, targets) -> {"loss_reg": mse}, like the detector in training mode.
    GroupNorm (per sample) keeps a batch of 2 equal to two accumulated batches of 1."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
        self.head = nn.Linear(16, 1)

    def forward(self, images, targets):
        features = self.backbone(torch.stack(images)).flatten(1)
        prediction = self.head(features).squeeze(1)
        value = torch.stack([target["value"] for target in targets])
        return {"loss_reg": F.mse_loss(prediction, value)}


def toy_model() -> ToyDetector:
    torch.manual_seed(0)
    return ToyDetector()


def toy_recipe(work_dir: Path, *overrides: str):
    """The demo recipe turned into a plain, warmup-free SGD run over the toy data."""
    return load_recipe(
        ROOT / "recipes/demo.yaml",
        [
            f"work_dir={work_dir}",
            "workflow=[[train,1]]",
            "total_epochs=1",
            "data.imgs_per_gpu=1",
            "data.workers_per_gpu=0",
            "optimizer.lr=0.1",
            "optimizer.base_batch_size=1",
            "optimizer.weight_decay=0",
            "lr_schedule.warmup_iters=0",
            "lr_schedule.steps=[]",
            "log_interval=1",
            *overrides,
        ],
    )


def train_toy(
    work_dir: Path, model: nn.Module, dataset: Dataset, *overrides: str, log_with: list = ()
):
    """Train in this process with the real engine; returns the metrics.jsonl records.
    ``log_with``: tracker instances to use instead of the recipe's ``trackers``."""
    cfg = toy_recipe(work_dir, *overrides)
    accelerator = build_accelerator(cfg)
    if log_with:
        accelerator.log_with = list(log_with)
    setup_logger(cfg.work_dir, accelerator.is_main_process)
    train_detector(model, {"train": dataset}, cfg, accelerator)
    return read_records(work_dir)


def read_records(work_dir: Path) -> list[dict]:
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
