"""Datasets and loaders built from the ``data`` section of a recipe.

A dataset class of your own is registered with ``@DATASETS.register`` and needs a classmethod
``from_config(cls, cfg, train=True)`` (a subclass of CocoDataset inherits its one); see
:meth:`DetectionDataset.options_from_config` for the arguments every dataset reads.
"""

from __future__ import annotations

from omegaconf import DictConfig

from trainer.data.base import DetectionDataset
from trainer.data.coco import CocoDataset, ShapesDataset
from trainer.data.hf import HFDataset
from trainer.data.loader import build_dataloader, collate
from trainer.registry import Registry, build

DATASETS = Registry(
    "dataset",
    {"CocoDataset": CocoDataset, "ShapesDataset": ShapesDataset, "HFDataset": HFDataset},
)


def build_dataset(cfg: DictConfig, train: bool = True):
    """``data.train`` or ``data.val`` -> the dataset its ``type`` names, with its transforms
    (training ones when ``train``).

    Bad annotations and image files are looked for first; ``on_bad_annotation`` (by default
    ``data.on_bad_annotation``) says whether they stop the run or are left out. Problems are
    RecipeErrors naming the node, e.g. ``data.train: ...``.
    """
    return build(DATASETS, cfg, train=train)


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
