"""Batching for detection: images and targets stay lists (sizes differ per image)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def collate(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]).

    Padding to a common, stride-divisible size happens in the model (MaskRCNN.preprocess),
    on the training device, which keeps torchvision's list-of-images contract.
    """
    images, targets = zip(*batch)
    return list(images), list(targets)


def build_dataloader(
    dataset: Dataset, imgs_per_gpu: int, workers_per_gpu: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A per-process DataLoader; Accelerate's prepare() later shards it across processes."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=imgs_per_gpu,
        shuffle=shuffle,
        num_workers=workers_per_gpu,
        collate_fn=collate,
        generator=generator,
        persistent_workers=workers_per_gpu > 0,
        drop_last=False,
    )
