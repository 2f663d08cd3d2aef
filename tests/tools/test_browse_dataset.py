"""browse_dataset on the demo recipe with tiny generated data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import decode_image

from trainer.config import load_recipe
from trainer.data import build_dataset
from trainer.data.shapes import generate_shapes
from trainer.seeding import SeededSamples
from trainer.tools import browse_dataset

DEMO = str(Path(__file__).resolve().parents[2] / "recipes/demo.yaml")


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    data = tmp_path_factory.mktemp("browse") / "shapes"
    generate_shapes(data, num_train=8, num_val=4, image_size=64)
    return [
        f"data.{split}.{key}={data}/{path}"
        for split in ("train", "val")
        for key, path in (("ann_file", f"annotations/{split}.json"), ("img_dir", split))
    ]


def test_train_split_after_the_training_transforms(overrides, tmp_path):
    written = browse_dataset.main([DEMO, "--num", "3", "--out", str(tmp_path), *overrides])
    assert [p.name for p in written] == ["1_000001.png", "2_000002.png", "3_000003.png"]
    assert sorted(tmp_path.iterdir()) == written

    # The same images and targets, drawn from the same seed.
    cfg = load_recipe(DEMO, overrides)
    dataset = SeededSamples(build_dataset(cfg.data.train, train=True), seed=0)
    for path in written:
        image, target = dataset[written.index(path)]
        overlay = decode_image(str(path))
        # Multi-scale training resize: the shortest side is one of the recipe's sizes.
        assert overlay.shape == image.shape and min(image.shape[1:]) in cfg.data.train.min_size
        changed = (overlay != image).any(dim=0)
        masks = target["masks"].bool().any(dim=0)
        assert masks.any()
        # The masks are drawn over (most of) their pixels; away from the boxes and the class
        # names placed next to them, nothing changes.
        assert changed[masks].float().mean() > 0.9
        far = torch.ones_like(changed)
        for x1, y1, x2, y2 in target["boxes"].round().long().tolist():
            far[max(y1 - 2, 0) : y2 + 3, max(x1 - 2, 0) : x2 + 3] = False
            # A name sits inside its box or just outside it.
            far[max(y1 - 16, 0) : y2 + 17, max(x1 - 64, 0) : x2 + 65] = False
        assert not changed[far].any()


def test_val_split_and_more_images_than_the_split_holds(overrides, tmp_path):
    written = browse_dataset.main(
        [DEMO, "--split", "val", "--num", "50", "--out", str(tmp_path), *overrides]
    )
    assert len(written) == 4
    for path in written:
        assert min(decode_image(str(path)).shape[1:]) == 144  # data.val.min_size of the demo
