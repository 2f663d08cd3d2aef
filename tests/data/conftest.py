"""Small generated datasets shared by the data tests."""

import copy
import json
import shutil
from pathlib import Path

import pytest

from trainer.data.shapes import generate_shapes


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes set: 12 train and 4 val images of about 64 px, polygons and RLE."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(root, num_train=12, num_val=4, image_size=64, seed=5)
    return root


@pytest.fixture
def coco_copy(shapes: Path, tmp_path: Path):
    """-> (annotation dict, write): a copy of the train split to edit, and a function that
    writes the edited dict next to a copy of the images, returning (ann_file, img_dir)."""
    data = json.loads((shapes / "annotations" / "train.json").read_text())
    img_dir = tmp_path / "images"
    shutil.copytree(shapes / "train", img_dir)

    def write(edited: dict) -> tuple[str, str]:
        path = tmp_path / "train.json"
        path.write_text(json.dumps(edited))
        return str(path), str(img_dir)

    return copy.deepcopy(data), write
