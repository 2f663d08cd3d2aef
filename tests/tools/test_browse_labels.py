"""browse_dataset's labels: left out on request, and on real crowded and sparse photos
(coco128) sized and placed so that they hide little of any object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_image

from tests.test_visualize_labels import _components, _outlines
from trainer.config import load_recipe
from trainer.data import build_dataset
from trainer.data.shapes import generate_shapes
from trainer.tools import browse_dataset
from trainer.visualize import INSIDE_FRACTION, OTHERS_FRACTION

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes/demo.yaml")
COCO128 = ROOT.parent / "shared/data/coco128"


def _val_targets(overrides: list[str]) -> list[dict]:
    dataset = build_dataset(load_recipe(DEMO, overrides).data.val, train=False)
    return [dataset[index][1] for index in range(len(dataset))]


def _browse(overrides: list[str], out: Path, *flags: str) -> list[torch.Tensor]:
    written = browse_dataset.main(
        [DEMO, "--split", "val", "--num", "100", "--out", str(out), *flags, *overrides]
    )
    return [decode_image(str(path)) for path in written]


def test_no_labels_draws_masks_and_outlines_only(tmp_path):
    data = tmp_path / "shapes"
    generate_shapes(data, num_train=1, num_val=4, image_size=64)
    overrides = [
        f"data.{split}.{key}={data}/{path}"
        for split in ("train", "val")
        for key, path in (("ann_file", f"annotations/{split}.json"), ("img_dir", split))
    ]
    bare = _browse(overrides, tmp_path / "bare", "--no-labels")
    named = _browse(overrides, tmp_path / "named")
    dataset = build_dataset(load_recipe(DEMO, overrides).data.val, train=False)
    assert len(bare) == len(dataset) == 4
    for index, (without, with_names) in enumerate(zip(bare, named, strict=True)):
        image, target = dataset[index]
        changed = (without != image).any(0)
        drawn = target["masks"].bool().any(0) | _outlines(target["boxes"], *image.shape[1:])
        assert changed.any() and not (changed & ~drawn).any()
        # Three classes: by default their names are written.
        assert not torch.equal(without, with_names)


CROWDED = (164, 196, 315)  # 40, 42 and 38 objects, many of them small
SPARSE = (400, 605)  # 2 and 4 large objects


@pytest.mark.skipif(not COCO128.is_dir(), reason="coco128 is not in shared/data")
def test_real_crowded_and_sparse_photos(tmp_path):
    coco = json.loads((COCO128 / "train.json").read_text())
    chosen = set(CROWDED + SPARSE)
    coco["images"] = [image for image in coco["images"] if image["id"] in chosen]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in chosen]
    ann_file = tmp_path / "chosen.json"
    ann_file.write_text(json.dumps(coco))
    overrides = [
        f"data.{split}.{key}={value}"
        for split in ("train", "val")
        for key, value in (
            ("type", "CocoDataset"),
            ("ann_file", ann_file),
            ("img_dir", COCO128 / "train"),
            ("min_size", "[480]"),
            ("max_size", 640),
        )
    ]
    named = _browse(overrides, tmp_path / "named")
    bare = _browse(overrides, tmp_path / "bare", "--no-labels")
    dataset = build_dataset(load_recipe(DEMO, overrides).data.val, train=False)
    for index, (with_names, without) in enumerate(zip(named, bare, strict=True)):
        target = dataset[index][1]
        masks = target["masks"].bool()
        text = (with_names != without).any(0)
        hidden = (text & masks).flatten(1).sum(1) / masks.flatten(1).sum(1)
        # Each object keeps at least 3/4 of its pixels in sight (the old opaque labels at
        # every top-left corner hid small cups and bottles whole).
        assert hidden.max() <= INSIDE_FRACTION + OTHERS_FRACTION, target["image_id"]
        labelled = _components(text)
        if target["image_id"] in SPARSE:
            assert labelled == len(masks)  # room for every name
        else:
            assert labelled >= len(masks) / 2
