"""Tests for the synthetic shapes dataset generator (trainer/data/shapes.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from trainer.data.shapes import CLASSES, ensure_shapes, generate_shapes

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~20 images: enough for both polygon and RLE annotations to appear."""
    root = tmp_path_factory.mktemp("shapes") / "ds"
    generate_shapes(root, num_train=20, num_val=4, image_size=96, seed=3)
    return root


def _annotation_files(root: Path) -> list[Path]:
    return [root / "annotations" / f"{split}.json" for split in ("train", "val")]


def test_same_arguments_give_identical_json(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "a", num_train=6, num_val=3, image_size=64, seed=7)
    generate_shapes(tmp_path / "b", num_train=6, num_val=3, image_size=64, seed=7)
    generate_shapes(tmp_path / "c", num_train=6, num_val=3, image_size=64, seed=8)
    for name in ("train.json", "val.json"):
        a = (tmp_path / "a" / "annotations" / name).read_bytes()
        assert a == (tmp_path / "b" / "annotations" / name).read_bytes()
        assert a != (tmp_path / "c" / "annotations" / name).read_bytes()
    # Only the three dataset folders remain: temporary folders were renamed into place.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_coco_structure(dataset: Path) -> None:
    for path in _annotation_files(dataset):
        data = json.loads(path.read_text())
        assert [c["name"] for c in data["categories"]] == list(CLASSES)
        assert [c["id"] for c in data["categories"]] == [1, 2, 3]
        assert all(c["supercategory"] == "shape" for c in data["categories"])
        image_ids = [im["id"] for im in data["images"]]
        ann_ids = [a["id"] for a in data["annotations"]]
        assert image_ids == list(range(1, len(image_ids) + 1))
        assert ann_ids == list(range(1, len(ann_ids) + 1))
        assert {a["image_id"] for a in data["annotations"]} <= set(image_ids)
        assert all(a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3) for a in data["annotations"])
        per_image = np.bincount([a["image_id"] for a in data["annotations"]])[1:]
        assert per_image.min() >= 1 and per_image.max() <= 5


def test_masks_agree_with_bbox_and_area(dataset: Path) -> None:
    for path in _annotation_files(dataset):
        coco = COCO(str(path))
        for ann in coco.loadAnns(coco.getAnnIds()):
            mask = coco.annToMask(ann)
            image = coco.imgs[ann["image_id"]]
            assert mask.shape == (image["height"], image["width"])
            assert mask.sum() >= 20
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.abs(np.array(tight) - np.array(ann["bbox"])).max() <= 1, ann["id"]
            assert abs(mask.sum() - ann["area"]) <= 0.03 * ann["area"], ann["id"]


def test_both_segmentation_formats_appear(dataset: Path) -> None:
    annotations = json.loads((dataset / "annotations" / "train.json").read_text())["annotations"]
    polygons = [a for a in annotations if isinstance(a["segmentation"], list)]
    rles = [a for a in annotations if isinstance(a["segmentation"], dict)]
    assert polygons and rles
    assert all(len(a["segmentation"]) == 1 and len(a["segmentation"][0]) >= 6 for a in polygons)
    assert all(isinstance(a["segmentation"]["counts"], str) for a in rles)
    circles = [a for a in polygons if a["category_id"] == 1]
    assert circles and all(24 <= len(a["segmentation"][0]) // 2 <= 32 for a in circles)


def test_images_match_json(dataset: Path) -> None:
    for split, path in zip(("train", "val"), _annotation_files(dataset), strict=True):
        images = json.loads(path.read_text())["images"]
        assert len(images) == len(list((dataset / split).glob("*.png")))
        for image in images:
            with Image.open(dataset / split / image["file_name"]) as im:
                assert im.mode == "RGB"
                assert im.size == (image["width"], image["height"])
                assert 0.8 * 96 - 1 <= min(im.size) <= max(im.size) <= 96


def test_complete_root_is_left_alone(dataset: Path) -> None:
    before = [p.read_bytes() for p in _annotation_files(dataset)]
    generate_shapes(dataset, num_train=2, num_val=1, seed=99)
    ensure_shapes(dataset, num_train=2, num_val=1, seed=99)
    assert [p.read_bytes() for p in _annotation_files(dataset)] == before


def test_ensure_generates_missing(tmp_path: Path) -> None:
    ensure_shapes(tmp_path / "ds", num_train=2, num_val=1, image_size=64)
    assert all(p.is_file() for p in _annotation_files(tmp_path / "ds"))


def test_non_empty_incomplete_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_shapes(tmp_path / "ds", num_train=1, num_val=1)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.data.shapes", str(out)]
        + "--num-train 3 --num-val 2 --image-size 64 --seed 1".split(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    train = json.loads((out / "annotations" / "train.json").read_text())
    assert len(train["images"]) == 3
    assert len(list((out / "val").glob("*.png"))) == 2
    summary = result.stdout.strip()
    assert "\n" not in summary
    assert f"train 3 images / {len(train['annotations'])} instances" in summary
    assert "val 2 images" in summary
