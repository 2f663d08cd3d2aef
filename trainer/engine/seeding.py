"""Random augmentations that depend only on (seed, epoch, sample), not on who loads it when."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


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
