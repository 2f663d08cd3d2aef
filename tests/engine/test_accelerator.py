"""The Accelerator a run gets: mixed precision from the accelerate config unless the recipe
sets it, and the recipe's DDP options."""

from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from trainer.config import load_recipe
from trainer.engine import build_accelerator

RECIPE = Path(__file__).resolve().parents[2] / "recipes/demo.yaml"


@pytest.mark.parametrize(
    ("launch", "recipe", "expected"),
    [
        ("bf16", None, "bf16"),  # `accelerate launch --mixed_precision bf16` / accelerate config
        ("bf16", "no", "no"),  # the recipe wins when it sets the key
        ("no", "bf16", "bf16"),
        (None, None, "no"),
    ],
)
def test_mixed_precision_comes_from_the_launch_unless_the_recipe_sets_it(
    monkeypatch, tmp_path, launch, recipe, expected
):
    if launch is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch)
    overrides = [f"work_dir={tmp_path}"]
    if recipe is not None:
        overrides.append(f"mixed_precision={recipe}")
    accelerator = build_accelerator(load_recipe(RECIPE, overrides))
    assert accelerator.mixed_precision == expected
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("value", [False, True])
def test_ddp_options_come_from_the_recipe(tmp_path, value):
    cfg = load_recipe(RECIPE, [f"work_dir={tmp_path}", f"ddp.find_unused_parameters={value}"])
    accelerator = build_accelerator(cfg)
    assert accelerator.ddp_handler.find_unused_parameters is value
