"""Batching for detection: images and targets stay lists (sizes differ per image); training
batches are grouped by image orientation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler


def collate(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]).

    Padding to a common, stride-divisible size happens in the model (MaskRCNN.preprocess),
    on the training device, which keeps torchvision's list-of-images contract.
    """
    images, targets = zip(*batch)
    return list(images), list(targets)


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` fixed by ``seed`` and the epoch: every process draws the
    same one, and each epoch another.

    Accelerate's prepared loader calls ``set_epoch`` before each epoch; without it (a plain
    DataLoader) each completed pass moves to the next epoch.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
        self.epoch += 1


class GroupedBatchSampler(BatchSampler):
    """Batches of ``batch_size`` indices that share a group (e.g. landscape or portrait
    images, which then pad less when stacked), in shuffled order; every index once per epoch.

    Indices are taken in :class:`EpochShuffle` order and a group's batch is emitted when it
    fills. The groups' remainders come last, mixed, as full batches and then at most one short
    batch: Accelerate's sharding (process ``p`` takes batches ``p, p + n, ...``) expects any
    short batch at the end. ``len`` is ``ceil(len(groups) / batch_size)``, as for a plain
    DataLoader.

    Args:
        groups: int [N], the group of each dataset index.
    """

    def __init__(self, groups: np.ndarray, batch_size: int, seed: int = 0):
        super().__init__(EpochShuffle(len(groups), seed), batch_size, drop_last=False)
        self.groups = np.asarray(groups)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.groups) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        pending: dict[int, list[int]] = {}
        for index in self.sampler:
            batch = pending.setdefault(int(self.groups[index]), [])
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                pending[int(self.groups[index])] = []
        rest = [index for batch in pending.values() for index in batch]
        for start in range(0, len(rest), self.batch_size):
            yield rest[start : start + self.batch_size]


def _worker_init(worker_id: int) -> None:
    # Imported here: the engine imports this package.
    from trainer.engine.preemption import keep_worker_through_stop_signals

    keep_worker_through_stop_signals()


def build_dataloader(
    dataset: Dataset,
    imgs_per_gpu: int,
    workers_per_gpu: int,
    shuffle: bool,
    seed: int = 0,
    group_by_aspect_ratio: bool = True,
) -> DataLoader:
    """A per-process DataLoader; Accelerate's prepare() later shards it across processes.

    With ``shuffle`` (training) and ``group_by_aspect_ratio``, batches hold images of one
    orientation (the dataset's ``aspect_groups``); datasets without them shuffle plainly.
    """
    # Fixes the workers' base seeds (and a plain shuffle's order) for a given seed. Training
    # wraps its dataset in SeededSamples, which seeds each sample's augmentations itself.
    generator = torch.Generator()
    generator.manual_seed(seed)
    common = dict(
        num_workers=workers_per_gpu,
        collate_fn=collate,
        generator=generator,
        persistent_workers=workers_per_gpu > 0,
        worker_init_fn=_worker_init,
    )
    groups = getattr(dataset, "aspect_groups", None)
    if shuffle and group_by_aspect_ratio and groups is not None:
        sampler = GroupedBatchSampler(groups, imgs_per_gpu, seed)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=imgs_per_gpu, shuffle=shuffle, drop_last=False, **common)
