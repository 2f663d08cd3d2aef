import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
DATA = """
data:
  train: {ann_file: a.json, img_dir: imgs}
  val: {ann_file: a.json, img_dir: imgs}
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_recipe(write(tmp_path, DATA), ["optimizer.lr=0.01", "model.backbone.name=resnet18"])
    assert cfg.optimizer.lr == 0.01
    assert cfg.model.backbone.name == "resnet18"
    assert cfg.work_dir == "work_dirs/recipe"
    assert cfg.model.rpn.nms_thresh == 0.7  # DESIGN defaults fill the rest
    assert cfg.model.roi_heads.box_coder_weights == [10.0, 10.0, 5.0, 5.0]


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(
        RecipeError, match=r"'model.backbone.nmae'.*Did you mean 'model.backbone.name'"
    ):
        load_recipe(write(tmp_path, DATA + "model:\n  backbone:\n    nmae: resnet18\n"))


def test_unknown_override_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"optimizer.lrr.*Did you mean 'optimizer.lr'"):
        load_recipe(write(tmp_path, DATA), ["optimizer.lrr=0.1"])


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(RecipeError, match=r"wrong type for key 'total_epochs'"):
        load_recipe(write(tmp_path, DATA + "total_epochs: twelve\n"))


@pytest.mark.parametrize(
    "workflow", ["[[test, 1]]", "[[train, 0]]", "[[val, 1]]", "[train, 1]", "[[train, 1, 2]]"]
)
def test_bad_workflow(tmp_path, workflow):
    with pytest.raises(RecipeError, match="workflow"):
        load_recipe(write(tmp_path, DATA + f"workflow: {workflow}\n"))


def test_missing_data_paths(tmp_path):
    with pytest.raises(RecipeError, match="data.train.ann_file must be set"):
        load_recipe(write(tmp_path, "seed: 1\n"))


def test_override_without_equals(tmp_path):
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(write(tmp_path, DATA), ["optimizer.lr"])


def test_shipped_recipes_load():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        load_recipe(recipe)


def test_cli_reports_one_line_without_traceback(tmp_path):
    recipe = write(tmp_path, DATA + "optimzer:\n  lr: 0.1\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "run.py"), str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown recipe key 'optimzer'" in result.stderr and "optimizer" in result.stderr


def test_cli_missing_coco_says_where_to_put_it(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainer" / "run.py"),
            str(ROOT / "recipes" / "mask_rcnn.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "data/coco/annotations/instances_train2017.json" in result.stderr


def test_unknown_evaluation_backend(tmp_path):
    with pytest.raises(RecipeError, match=r"evaluation.backend must be one of"):
        load_recipe(write(tmp_path, DATA), ["evaluation.backend=detectron2"])
