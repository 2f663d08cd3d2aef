"""Aspect-ratio grouped batches: one orientation per batch, every image once per epoch, also
when Accelerate shards the loader across processes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader

from trainer.data import build_dataloader
from trainer.data.coco import CocoDataset
from trainer.data.loader import GroupedBatchSampler

ROOT = Path(__file__).resolve().parents[2]


def check_epoch(batches: list[list[int]], groups: np.ndarray, batch_size: int) -> None:
    """Every index once; all batches full and of one group, but for the groups' remainders,
    which come last (at most two batches, the last possibly short)."""
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(groups)))
    assert len(batches) == math.ceil(len(groups) / batch_size)
    mixed = [k for k, batch in enumerate(batches) if len(set(groups[batch])) > 1]
    short = [k for k, batch in enumerate(batches) if len(batch) < batch_size]
    assert all(k >= len(batches) - 2 for k in mixed + short)
    assert short in ([], [len(batches) - 1])


def test_every_index_once_per_epoch_in_groups():
    groups = np.random.default_rng(0).integers(0, 2, 103)
    sampler = GroupedBatchSampler(groups, batch_size=4, seed=7)
    assert len(sampler) == 26
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        check_epoch(batches, groups, 4)
        epochs.append(batches)
    assert epochs[0] != epochs[1] and epochs[0] == epochs[2]
    # Both orientations are interleaved through the epoch, not one after the other.
    first_groups = [groups[batch[0]] for batch in epochs[0][:-2]]
    assert sum(np.diff(first_groups) != 0) > 3


def test_plain_loader_moves_to_the_next_epoch_by_itself():
    sampler = GroupedBatchSampler(np.zeros(10, np.int64), batch_size=3)
    assert list(sampler) != list(sampler)


@pytest.fixture(scope="module")
def dataset(shapes) -> CocoDataset:
    return CocoDataset(shapes / "annotations" / "train.json", shapes / "train")


def landscape(dataset: CocoDataset, image_ids: list[int]) -> list[bool]:
    table = dataset.annotations
    index = np.searchsorted(table.image_ids, image_ids)
    return (table.widths[index] > table.heights[index]).tolist()


def epoch_ids(loader) -> list[list[int]]:
    return [[t["image_id"] for t in targets] for _, targets in loader]


def test_accelerator_prepare_keeps_groups_and_reshuffles(dataset):
    groups = dataset.aspect_groups
    assert 0 < groups.sum() < len(groups)  # both orientations present
    loader = Accelerator(cpu=True).prepare(build_dataloader(dataset, 2, 0, True, seed=3))
    to_index = {int(i): k for k, i in enumerate(dataset.annotations.image_ids)}
    epochs = []
    for _ in range(2):
        batches = [[to_index[i] for i in ids] for ids in epoch_ids(loader)]
        check_epoch(batches, groups, 2)
        epochs.append(batches)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("processes", [2, 3])
def test_sharded_loaders_split_each_epoch(dataset, processes):
    """prepare_data_loader is what Accelerator.prepare applies in each of n processes."""
    batch_size = 2
    per_process = []
    for rank in range(processes):
        loader = build_dataloader(dataset, batch_size, 0, True, seed=3)
        shard = prepare_data_loader(
            loader, num_processes=processes, process_index=rank, put_on_device=False
        )
        per_process.append([epoch_ids(shard) for _ in range(2)])
    for epoch in range(2):
        shards = [runs[epoch] for runs in per_process]
        assert len({len(batches) for batches in shards}) == 1  # same number of steps
        seen = [i for batches in shards for ids in batches for i in ids]
        assert set(seen) == set(dataset.annotations.image_ids.tolist())
        # Accelerate repeats a few images at the end so every process gets full batches.
        assert len(seen) - len(dataset) < processes * batch_size
        for batches in shards:
            for ids in batches[:-1]:
                assert len(set(landscape(dataset, ids))) == 1
    assert per_process[0][0] != per_process[0][1]


SCRIPT = """
import json, sys
from accelerate import Accelerator
from accelerate.utils import gather_object
from trainer.data import build_dataloader
from trainer.data.coco import CocoDataset

accelerator = Accelerator()
dataset = CocoDataset(sys.argv[1], sys.argv[2])
loader = accelerator.prepare(build_dataloader(dataset, 2, 1, True, seed=5))
epochs = [[[t["image_id"] for t in targets] for _, targets in loader] for _ in range(2)]
everything = gather_object([(accelerator.process_index, epochs)])
if accelerator.is_main_process:
    with open(sys.argv[3], "w") as f:
        json.dump(everything, f)
"""


def test_two_launched_processes(dataset, shapes, tmp_path):
    """Two real processes (gloo on CPU; Accelerate needs ACCELERATE_USE_CPU for that)."""
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        str(script),
        str(shapes / "annotations" / "train.json"),
        str(shapes / "train"),
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = dict((rank, epochs) for rank, epochs in json.loads(out.read_text()))
    assert sorted(runs) == [0, 1]
    for epoch in range(2):
        seen = [i for rank in runs for ids in runs[rank][epoch] for i in ids]
        assert sorted(seen) == sorted(dataset.annotations.image_ids.tolist())  # 12 = 2 x 2 x 3
        for rank in runs:
            for ids in runs[rank][epoch][:-1]:
                assert len(set(landscape(dataset, ids))) == 1
    assert runs[0][0] != runs[0][1]
