import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import TRACKERS, RecipeError, load_recipe

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


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.01", "optimizer.lr must be > 0, got -0.01."),
        ("data.imgs_per_gpu=0", "data.imgs_per_gpu must be >= 1, got 0."),
        ("data.val.min_size=[]", "data.val.min_size must be a non-empty list of numbers > 0"),
        ("data.train.flip_prob=1.5", "data.train.flip_prob must be in [0, 1], got 1.5."),
        ("model.rpn.positive_fraction=0", "model.rpn.positive_fraction must be in (0, 1]"),
        ("model.roi_heads.norm=bn", "model.roi_heads.norm must be one of ['none', 'gn']"),
        ("ema.decay=1", "ema.decay must be in (0, 1), got 1.0."),
        ("max_iters=0", "max_iters must be >= 1, got 0."),
        ("trackers=[wandbb]", "trackers must be a list of names among"),
        ("data.on_bad_annotation=ignore", "data.on_bad_annotation must be one of"),
        ("mixed_precision=fp8", "mixed_precision must be null, no, fp16 or bf16, got 'fp8'."),
        ("data.train.type=HFDataset", "data.train.path must name the Hugging Face dataset"),
    ],
)
def test_value_out_of_range_names_key_and_value(tmp_path, override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, DATA), [override])
    assert message in str(error.value)
    assert str(error.value).startswith(f"{tmp_path / 'recipe.yaml'} with overrides {override}:")


def test_null_passes_the_rules_of_optional_keys(tmp_path):
    cfg = load_recipe(write(tmp_path, DATA), ["max_iters=null", "data.train.lsj_size=null"])
    assert cfg.max_iters is None and cfg.data.train.lsj_size is None


def test_tracker_names_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert sorted(TRACKERS) == sorted(LOGGER_TYPE_TO_CLASS)


@pytest.mark.parametrize(("text", "holds"), [("- a\n- b\n", "a list"), ("", "nothing")])
def test_a_recipe_that_is_not_a_mapping_is_named(tmp_path, text, holds):
    with pytest.raises(RecipeError, match=f"a recipe is a mapping of keys.*holds {holds}"):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "project: ${oc.env:TRAINER_UNSET_VARIABLE}",
            "project: environment variable 'TRAINER_UNSET_VARIABLE' is not set.",
        ),
        ("project: ${optimizer.nope}", "project: Interpolation key 'optimizer.nope' not found."),
    ],
)
def test_unresolvable_interpolation_is_one_line_naming_the_key(tmp_path, line, message):
    recipe = write(tmp_path, line + DATA)
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert str(error.value) == f"{recipe}: {message}"
