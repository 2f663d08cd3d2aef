"""``load_from``: a run that starts from another run's weights, on a class set that shares
some classes with it."""

import json
import subprocess

import pytest
from safetensors.torch import load_file

from tests.engine.runs import ENV, ROOT, run, tiny_recipe, tiny_shapes, train_command
from tests.engine.toy import ToyDataset, toy_model, toy_recipe
from trainer.config import RecipeError
from trainer.engine import train_detector


def test_fine_tune_from_a_run_with_other_classes(tmp_path):
    data = tiny_shapes(tmp_path / "shapes")
    source_dir = tmp_path / "source"
    run(train_command(*tiny_recipe(data, source_dir), "max_iters=2", "workflow=[[train,1]]"))
    classes = json.loads((source_dir / "checkpoints/final/classes.json").read_text())
    assert classes["names"] == ["circle", "square", "triangle"]

    # The new set: squares become "box", triangles stay, circles are gone; "square" is new.
    train = json.loads((data / "annotations/train.json").read_text())
    names = {1: None, 2: "box", 3: "triangle"}
    train["categories"] = [
        {**c, "name": names[c["id"]]} for c in train["categories"] if names[c["id"]]
    ] + [{"id": 9, "name": "square"}]
    train["annotations"] = [a for a in train["annotations"] if names[a["category_id"]]]
    new_ann = tmp_path / "new_train.json"
    new_ann.write_text(json.dumps(train))

    work_dir = tmp_path / "target"
    overrides = [
        *tiny_recipe(data, work_dir),
        f"data.train.ann_file={new_ann}",
        "workflow=[[train,1]]",
        "max_iters=1",
        "optimizer.lr=1e-12",  # one step that leaves the weights as loaded
        "lr_schedule.warmup_iters=0",
        f"load_from={source_dir}",
    ]
    run(train_command(*overrides))
    log = (work_dir / "log.txt").read_text()
    # The source's latest checkpoint, in this project's format, and what was transferred:
    # labels of the new set by category id are box (2), triangle (3), square (9).
    assert f"weights from {source_dir}/checkpoints/" in log
    assert "2 classes kept (triangle, square); 1 new (box)" in log
    source = load_file(source_dir / "checkpoints/final/model.safetensors")
    target = load_file(work_dir / "checkpoints/final/model.safetensors")
    # Rows [background, box, triangle, square] <- source [background, -, triangle, square].
    weight = "roi_heads.box_head.cls_score.weight"
    assert target[weight].shape == source[weight].shape
    for new_row, old_row in ((0, 0), (2, 3), (3, 2)):
        assert (target[weight][new_row] - source[weight][old_row]).abs().max() < 1e-6
    fpn = "fpn.fpn.layer_blocks.0.0.weight"
    assert (target[fpn] - source[fpn]).abs().max() < 1e-6

    # Resuming the run does not load the source again.
    run(train_command(*overrides, "resume=auto", "max_iters=2"))
    assert "skipped: the run resumes" in (work_dir / "log.txt").read_text()

    # A load_from that is not there: one line naming it, before training.
    missing = subprocess.run(
        train_command(*overrides[:-1], f"load_from={tmp_path / 'nowhere'}"),
        env=ENV,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: load_from {tmp_path / 'nowhere'}: weights '{tmp_path / 'nowhere'}' not found"
        )
    ), missing.stderr[-2000:]


def test_a_val_set_with_other_categories_stops_before_training(tmp_path):
    class OtherClasses(ToyDataset):
        CLASSES = ("thing", "other")

    cfg = toy_recipe(tmp_path / "run")
    datasets = {"train": ToyDataset(), "val": OtherClasses()}
    with pytest.raises(RecipeError, match="val set's categories differ.*'thing', 2: 'other'"):
        train_detector(toy_model(), datasets, cfg)
    assert not (tmp_path / "run/metrics.jsonl").exists()
