import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.seeding import SeededSamples


class RandomItems(Dataset):
    """Each item draws from torch, random and numpy, as augmentations may."""

    CLASSES = ("a", "b")

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        return torch.rand(2), random.random(), float(np.random.rand())


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_a_sample_draws_the_same_in_any_order_and_anew_each_epoch():
    data = SeededSamples(RandomItems(), seed=3)
    data.set_epoch(1)
    forward = [data[i] for i in range(6)]
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    backward = [data[i] for i in reversed(range(6))][::-1]
    assert all(same(a, b) for a, b in zip(forward, backward, strict=True))
    assert not same(forward[0], forward[1])
    data.set_epoch(2)
    assert not same(data[0], forward[0])
    assert data.CLASSES == ("a", "b")


def test_loading_leaves_the_global_random_states_alone():
    data = SeededSamples(RandomItems(), seed=3)
    torch_state, python_state, numpy_state = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(),
    )
    data[0]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_batches_do_not_depend_on_the_number_of_workers():
    def epochs(workers: int) -> list:
        data = SeededSamples(RandomItems(), seed=3)
        loader = DataLoader(data, batch_size=2, num_workers=workers, persistent_workers=workers > 0)
        seen = []
        for epoch in (0, 1):
            # persistent workers see the new epoch through shared memory
            data.set_epoch(epoch)
            seen.extend(batch[0] for batch in loader)
        return seen

    for a, b in zip(epochs(0), epochs(2), strict=True):
        torch.testing.assert_close(a, b)
