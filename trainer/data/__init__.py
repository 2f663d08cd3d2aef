"""Datasets and loaders built from the ``data`` section of a recipe."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.config import RecipeError
from trainer.data.base import DetectionDataset
from trainer.data.coco import CocoDataset, ShapesDataset
from trainer.data.hf import HFDataset
from trainer.data.loader import build_dataloader, collate
from trainer.data.transforms import build_transforms
from trainer.registry import Registry

DATASETS = Registry(
    "dataset",
    {"CocoDataset": CocoDataset, "ShapesDataset": ShapesDataset, "HFDataset": HFDataset},
)


def _transforms(cfg: DictConfig, train: bool, split: str):
    lsj_size = cfg.get("lsj_size") if train else None
    lsj_scale = tuple(cfg.get("lsj_scale", (0.1, 2.0)))
    color_jitter = cfg.get("color_jitter", 0.0) if train else 0.0
    if lsj_size is not None and lsj_size <= 0:
        raise RecipeError(f"data.{split}.lsj_size must be a positive size in pixels or null.")
    if len(lsj_scale) != 2 or not 0 < lsj_scale[0] <= lsj_scale[1]:
        raise RecipeError(
            f"data.{split}.lsj_scale must be [low, high] with 0 < low <= high, e.g. [0.1, 2.0]."
        )
    if color_jitter < 0:
        raise RecipeError(f"data.{split}.color_jitter must be >= 0 (0: off), e.g. 0.4.")
    return build_transforms(
        list(cfg.min_size),
        cfg.max_size,
        cfg.flip_prob if train else 0.0,
        lsj_size=lsj_size,
        lsj_scale=lsj_scale,
        color_jitter=color_jitter,
    )


def build_dataset(cfg: DictConfig, train: bool = True):
    """``data.train`` or ``data.val`` -> dataset with its transforms.

    Bad annotations and image files are looked for first; ``on_bad_annotation`` (by default
    ``data.on_bad_annotation``) says whether they stop the run or are left out.
    """
    split = "train" if train else "val"
    cls = DATASETS.get(cfg.type)
    transforms = _transforms(cfg, train, split)
    filter_empty = cfg.filter_empty and train
    if not (isinstance(cls, type) and issubclass(cls, DetectionDataset)):
        # A user's own dataset class keeps the original constructor.
        return cls(cfg.ann_file, cfg.img_dir, transforms, filter_empty)
    options = {
        # Unresolvable when this node is used outside a recipe (no data.on_bad_annotation).
        "on_bad_annotation": OmegaConf.select(
            cfg, "on_bad_annotation", default="error", throw_on_resolution_failure=False
        )
        or "error",
        "check_images": cfg.get("check_images", True),
    }
    if issubclass(cls, HFDataset):
        if not cfg.get("path"):
            raise RecipeError(
                f"data.{split}.path must name the Hugging Face dataset: a Hub name or a "
                "folder written by save_to_disk."
            )
        return cls(
            cfg.path,
            cfg.get("split") or ("train" if train else "validation"),
            transforms,
            filter_empty,
            columns=dict(cfg.get("columns") or {}),
            bbox_format=cfg.get("bbox_format", "xywh"),
            **options,
        )
    if cls is CocoDataset:
        for key in ("ann_file", "img_dir"):
            if not Path(cfg[key]).exists():
                raise RecipeError(
                    f"{key} '{cfg[key]}' does not exist. Put the COCO-format data there or "
                    f"point the recipe at it, e.g. data.{split}.{key}=PATH "
                    "(COCO 2017: data/coco/annotations/instances_train2017.json and "
                    "data/coco/train2017/, from https://cocodataset.org/#download)."
                )
    return cls(cfg.ann_file, cfg.img_dir, transforms, filter_empty, **options)


__all__ = [
    "DATASETS",
    "CocoDataset",
    "DetectionDataset",
    "HFDataset",
    "ShapesDataset",
    "build_dataloader",
    "build_dataset",
    "collate",
]
