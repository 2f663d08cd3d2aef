"""Every random stream of a run, seeded from the recipe's ``seed``.

- :func:`seed_everything`: the global generators at the start of a run (model initialisation,
  proposal sampling in the training step), different per process.
- :class:`SeededSamples`: each training sample's augmentations, a function of (seed, epoch,
  index) only, so a resumed run sees the same pixels as an uninterrupted one.
- :func:`private_random_stream`: a forked stream for work that must not move the training
  stream (the val losses sample proposals too).
- The data order is Accelerate's seedable sampler (``build_accelerator``), a function of
  (seed, epoch).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and accelerators) with ``seed`` plus the process
    index, so that processes sample differently but every run repeats itself."""
    set_seed(seed, device_specific=True)


@contextlib.contextmanager
def private_random_stream(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on torch's generators (CPU and ``device``'s) seeded with ``seed``, then
    restore them: the block draws the same numbers every time and the caller's stream is left
    exactly where it was."""
    if device.type == "cpu":
        forked = torch.random.fork_rng(devices=[])
    else:
        forked = torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)
    with forked:
        torch.manual_seed(seed)
        yield


class SeededSamples(Dataset):
    """Wraps a training dataset so that each sample's random transforms draw from generators
    seeded by ``(seed, epoch, index)``.

    Without this, augmentations draw from the process' global random state (no workers) or
    from each worker's stream: they then depend on the number of workers, on the loader's
    one-batch look-ahead, and on where a resumed run restarts, so a resumed run would not
    repeat an uninterrupted one. The global random states of torch, ``random`` and numpy are
    seeded for the call and restored after it, so loading never disturbs the model's random
    stream either. Other attributes (``CLASSES``, ``coco``, ...) are the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        # In shared memory, so that persistent worker processes see the epoch the main process
        # sets before each epoch.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = np.random.SeedSequence([self.seed, int(self._epoch), int(index)])
        torch_seed, python_seed, numpy_seed = seed.generate_state(3).tolist()
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also reseed the GPUs', which
                # the model draws from.
                torch.default_generator.manual_seed(torch_seed)
                random.seed(python_seed)
                np.random.seed(numpy_seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a worker): avoid recursing
            raise AttributeError(name)
        return getattr(self.dataset, name)
