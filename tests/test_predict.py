"""`python -m trainer.predict` on a briefly trained demo checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision.io import decode_image

from trainer import evaluate, predict
from trainer.config import RecipeError
from trainer.data.shapes import generate_shapes

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "recipes/demo.yaml")
# The model's own score threshold: every detection it returns is kept.
ALL = "0.05"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two training iterations of the demo recipe on 64 px shapes; returns (root, overrides).

    Val images (~60 px) are resized to 96 px, so results must be mapped back to the original
    size.
    """
    root = tmp_path_factory.mktemp("predict")
    data = root / "shapes"
    generate_shapes(data, num_train=8, num_val=4, image_size=64)
    overrides = [
        f"work_dir={root / 'work'}",
        f"data.train.ann_file={data}/annotations/train.json",
        f"data.train.img_dir={data}/train",
        f"data.val.ann_file={data}/annotations/val.json",
        f"data.val.img_dir={data}/val",
        "data.train.type=CocoDataset",
        "data.val.type=CocoDataset",
        "data.train.min_size=[64]",
        "data.val.min_size=[96]",
        "data.workers_per_gpu=0",
        "data.imgs_per_gpu=4",
        "model.roi_heads.detections_per_img=20",
    ]
    command = [sys.executable, str(ROOT / "trainer/run.py"), DEMO, *overrides]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [*command, "max_iters=2", "workflow=[[train,1]]"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, overrides


def _predict(root: Path, overrides: list[str], images: Path, out: str, *flags: str) -> list:
    args = ["--checkpoint", str(root / "work"), "--images", str(images), "--out", str(root / out)]
    results = predict.main([DEMO, *args, *flags, *overrides])
    assert json.loads((root / out / "predictions.json").read_text()) == results
    return results


def test_predictions_and_overlays(trained):
    root, overrides = trained
    val = root / "shapes/val"
    results = _predict(root, overrides, val, "out", "--score-threshold", ALL, "--batch-size", "3")
    assert results, "the model returned no detections"
    images = {
        info["file_name"]: info
        for info in json.loads((root / "shapes/annotations/val.json").read_text())["images"]
    }
    names = {1: "circle", 2: "square", 3: "triangle"}
    for result in results:
        info = images[result["file_name"]]
        assert set(result) == {
            "file_name",
            "category_id",
            "category_name",
            "bbox",
            "score",
            "segmentation",
        }
        assert result["category_name"] == names[result["category_id"]]
        assert result["score"] >= float(ALL)
        # At the original size, not the 96 px the model saw.
        assert result["segmentation"]["size"] == [info["height"], info["width"]]
        x, y, w, h = result["bbox"]
        assert (
            0 <= x and 0 <= y and x + w <= info["width"] + 0.01 and y + h <= info["height"] + 0.01
        )

    overlays = sorted((root / "out/overlays").iterdir())
    assert [p.name for p in overlays] == sorted(images)
    for path in overlays:
        original = decode_image(str(val / path.name))
        overlay = decode_image(str(path))
        assert overlay.shape == original.shape
        drawn = any(r["file_name"] == path.name for r in results)
        assert drawn == (not torch.equal(overlay, original))


def test_same_detections_as_evaluate(trained):
    """Image files through predict and the val set through evaluate give the same results."""
    root, overrides = trained
    batch = ["data.imgs_per_gpu=3"]
    results = _predict(
        root, overrides + batch, root / "shapes/val", "same", "--score-threshold", ALL
    )
    evaluate.main(
        [DEMO, "--checkpoint", str(root / "work"), "--out", str(root / "eval"), *overrides, *batch]
    )
    reference = json.loads((root / "eval/predictions.json").read_text())
    file_names = {
        info["id"]: info["file_name"]
        for info in json.loads((root / "shapes/annotations/val.json").read_text())["images"]
    }
    for result in reference:
        result["file_name"] = file_names[result.pop("image_id")]
    assert [{k: v for k, v in r.items() if k != "category_name"} for r in results] == reference


def test_the_checkpoint_brings_its_recipe_and_classes(trained, tmp_path):
    """No RECIPE and no annotation file: the checkpoint's config.yaml and classes.json are
    enough, and give the same predictions."""
    root, overrides = trained
    with_recipe = _predict(root, overrides, root / "shapes/val", "r", "--score-threshold", ALL)
    moved = tmp_path / "moved"
    (root / "shapes/annotations").rename(moved)
    try:
        results = predict.main(
            [
                *("--checkpoint", str(root / "work/checkpoints/final")),
                *("--images", str(root / "shapes/val"), "--out", str(tmp_path / "out")),
                *("--score-threshold", ALL),
                "data.workers_per_gpu=0",
            ]
        )
    finally:
        moved.rename(root / "shapes/annotations")
    assert results == with_recipe
    assert {r["category_name"] for r in results} <= {"circle", "square", "triangle"}


def test_threshold_above_every_score_draws_nothing(trained):
    root, overrides = trained
    image = root / "shapes/val/000002.png"
    assert _predict(root, overrides, image, "none", "--score-threshold", "1.01") == []
    overlays = list((root / "none/overlays").iterdir())
    assert [p.name for p in overlays] == ["000002.png"]
    assert torch.equal(decode_image(str(overlays[0])), decode_image(str(image)))


def test_errors_name_the_problem(trained, tmp_path, monkeypatch, capsys):
    root, overrides = trained
    with pytest.raises(FileNotFoundError, match="no images"):
        _predict(root, overrides, tmp_path, "x")
    # Weights without their class list (a bare state dict) and no annotation file to read
    # the classes from.
    bare = tmp_path / "bare.pth"
    torch.save(load_file(root / "work/checkpoints/final/model.safetensors"), bare)
    no_classes = [
        *overrides,
        f"data.val.ann_file={tmp_path}/a.json",
        f"data.train.ann_file={tmp_path}/b.json",
    ]
    args = ["--checkpoint", str(bare), "--images", str(root / "shapes/val"), "--out", "x"]
    with pytest.raises(RecipeError, match="do not name their classes.*data.val.ann_file"):
        predict.main([DEMO, *args, *no_classes])
    with pytest.raises(RecipeError, match="carry no recipe"):
        predict.main([*args, *no_classes])

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "predict",
            DEMO,
            "--checkpoint",
            str(root / "work"),
            "--images",
            str(tmp_path / "missing.png"),
            "--out",
            str(tmp_path),
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        predict.cli()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --images '{tmp_path / 'missing.png'}' is neither an image file nor a folder."
    )


@pytest.mark.slow
def test_two_processes_share_the_images(trained):
    """Two gloo processes (torchrun on the CPU) each take half the images; the gathered
    predictions.json matches the single-process one."""
    root, overrides = trained
    val = root / "shapes/val"
    single = _predict(root, overrides, val, "single", "--score-threshold", ALL, "--batch-size", "1")
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "-m",
        "trainer.predict",
        DEMO,
        *["--checkpoint", str(root / "work"), "--images", str(val), "--out", str(root / "two")],
        *["--score-threshold", ALL, "--batch-size", "1", *overrides],
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((root / "two/predictions.json").read_text())
    # torchrun runs each process on one thread: sums in another order, floats differ slightly.
    exact = [{k: v for k, v in r.items() if k not in ("bbox", "score")} for r in single]
    assert [{k: v for k, v in r.items() if k not in ("bbox", "score")} for r in two] == exact

    def numbers(results: list[dict]) -> list[float]:
        return [v for r in results for v in (*r["bbox"], r["score"])]

    # Boxes are rounded to 0.01 px: a tiny difference can move one by a hundredth.
    assert numbers(two) == pytest.approx(numbers(single), abs=0.011)
    assert sorted(p.name for p in (root / "two/overlays").iterdir()) == sorted(
        p.name for p in val.iterdir()
    )


def test_boxes_only_models_leave_masks_out(trained, tmp_path):
    """A model trained on boxes only (classes.json has_masks: false; for weights without
    it, an annotation file without segmentations) gets no masks in its outputs."""
    root, overrides = trained
    images = root / "shapes/val"
    with_masks = _predict(root, overrides, images, "masks", "--score-threshold", ALL)
    boxes_model = tmp_path / "boxes_model"
    shutil.copytree(root / "work/checkpoints/final", boxes_model)
    classes = json.loads((boxes_model / "classes.json").read_text())
    (boxes_model / "classes.json").write_text(json.dumps({**classes, "has_masks": False}))

    val = json.loads((root / "shapes/annotations/val.json").read_text())
    for ann in val["annotations"]:
        del ann["segmentation"]
    boxes_only = tmp_path / "val_boxes_only.json"
    boxes_only.write_text(json.dumps(val))
    bare = tmp_path / "bare.pth"
    torch.save(load_file(boxes_model / "model.safetensors"), bare)

    for checkpoint, extra in ((boxes_model, []), (bare, [f"data.val.ann_file={boxes_only}"])):
        args = ["--checkpoint", str(checkpoint), "--images", str(images)]
        out = tmp_path / f"out_{checkpoint.stem}"
        results = predict.main(
            [DEMO, *args, "--out", str(out), "--score-threshold", ALL, *overrides, *extra]
        )
        assert results and all("segmentation" not in r for r in results)
        assert [r["bbox"] for r in results] == [r["bbox"] for r in with_masks]


def test_overlays_of_images_that_differ_by_extension_do_not_collide(tmp_path):
    names = ["a.jpg", "a.png", "a.JPEG", "sub/a.webp"]
    paths = [predict.overlay_path(tmp_path, name) for name in names]
    assert len(set(paths)) == len(names)
    assert paths[1] == tmp_path / "overlays/a.png"  # a PNG keeps its name
    assert paths[0] == tmp_path / "overlays/a.jpg.png"
