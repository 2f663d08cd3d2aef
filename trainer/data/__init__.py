"""Datasets and loaders built from the ``data`` section of a recipe."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from trainer.config import RecipeError
from trainer.data.coco import CocoDataset, ShapesDataset
from trainer.data.loader import build_dataloader, collate
from trainer.data.transforms import build_transforms
from trainer.registry import Registry

DATASETS = Registry("dataset", {"CocoDataset": CocoDataset, "ShapesDataset": ShapesDataset})


def build_dataset(cfg: DictConfig, train: bool = True):
    """``data.train`` or ``data.val`` -> dataset with its transforms."""
    cls = DATASETS.get(cfg.type)
    if cls is CocoDataset:
        for key in ("ann_file", "img_dir"):
            if not Path(cfg[key]).exists():
                raise RecipeError(
                    f"{key} '{cfg[key]}' does not exist. Put the COCO-format data there or "
                    f"point the recipe at it, e.g. data.{'train' if train else 'val'}.{key}=PATH "
                    "(COCO 2017: data/coco/annotations/instances_train2017.json and "
                    "data/coco/train2017/, from https://cocodataset.org/#download)."
                )
    transforms = build_transforms(list(cfg.min_size), cfg.max_size, cfg.flip_prob if train else 0.0)
    return cls(cfg.ann_file, cfg.img_dir, transforms, cfg.filter_empty and train)


__all__ = ["DATASETS", "build_dataloader", "build_dataset", "collate"]
