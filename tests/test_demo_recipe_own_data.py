"""recipes/demo.yaml pointed at a user's own COCO files: trains on them, writes nothing there."""

import subprocess

import pytest

from tests.engine.runs import ENV, ROOT, read_records, run, train_command
from trainer.data import ShapesDataset
from trainer.data.shapes import generate_shapes


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def paths(anns, images):
    return [
        f"data.train.ann_file={anns}/train.json",
        f"data.train.img_dir={images}/train",
        f"data.val.ann_file={anns}/val.json",
        f"data.val.img_dir={images}/val",
    ]


def test_the_four_path_overrides_are_enough(tmp_path):
    mine = tmp_path / "mine"
    generate_shapes(mine, num_train=4, num_val=2, image_size=64, seed=5)
    # The user's own layout: annotation files elsewhere than the images' parent.
    (mine / "annotations").rename(tmp_path / "anns")
    before = listing(tmp_path)
    work_dir = tmp_path / "work"
    run(
        train_command(
            *paths(tmp_path / "anns", mine),
            f"work_dir={work_dir}",
            "max_iters=2",
            "workflow=[[train,1]]",
            "data.workers_per_gpu=0",
            "model.backbone.name=test_resnet",
        ),
        cwd=tmp_path,
    )
    assert (work_dir / "checkpoints/final/model.safetensors").is_file()
    assert [r["iter"] for r in read_records(work_dir) if "loss" in r] == [1, 2]
    assert [p for p in listing(tmp_path) if not p.startswith("work")] == before


def test_missing_files_are_named_and_nothing_is_generated(tmp_path):
    empty = tmp_path / "empty"
    (empty / "annotations").mkdir(parents=True)
    result = subprocess.run(
        train_command(*paths(empty / "annotations", empty), f"work_dir={tmp_path / 'work'}"),
        env=ENV,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{empty}/annotations/train.json" in last, last
    assert listing(empty) == ["annotations"]


def test_only_the_demo_recipes_own_paths_are_generated(tmp_path, monkeypatch):
    """The demo set goes to data/shapes/{annotations,train,val} only: a user's COCO files
    elsewhere under data/shapes/ are read as they are, and a data/shapes/ holding them is
    never filled with the demo set."""
    monkeypatch.chdir(tmp_path)
    generate_shapes(tmp_path / "source", num_train=2, num_val=1, image_size=64, seed=5)
    mine = tmp_path / "data" / "shapes"
    mine.mkdir(parents=True)
    (tmp_path / "source/annotations").rename(mine / "anns")
    (tmp_path / "source/train").rename(mine / "imgs")
    before = listing(tmp_path)
    assert len(ShapesDataset("data/shapes/anns/train.json", "data/shapes/imgs")) == 2
    assert listing(tmp_path) == before
    with pytest.raises(FileNotFoundError) as error:
        ShapesDataset("data/shapes/annotations/train.json", "data/shapes/train")
    assert str(error.value).startswith(
        "data/shapes/annotations/train.json does not exist and data/shapes holds other files"
    )
    assert listing(tmp_path) == before
