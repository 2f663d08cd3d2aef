import pytest
from omegaconf import OmegaConf

from trainer.config import RecipeError
from trainer.data import DATASETS
from trainer.models import DETECTORS
from trainer.registry import Registry, build


def test_unknown_type_lists_valid_ones():
    with pytest.raises(RecipeError, match=r"unknown detector type 'MaskRCN'.*MaskRCNN"):
        DETECTORS.get("MaskRCN")
    with pytest.raises(RecipeError, match="CocoDataset, HFDataset, ShapesDataset"):
        DATASETS.get("Coco")


def test_register_a_user_class():
    table = Registry("thing")

    @table.register
    class Custom:
        pass

    assert table.get("Custom") is Custom
    assert "Custom" in table


def test_build_makes_the_named_class_from_its_node_and_names_the_node_in_errors():
    table = Registry("part")

    @table.register
    class Part:
        def __init__(self, size: int, scale: int):
            if size < 0:
                raise ValueError(f"size must be >= 0, got {size}.")
            self.size, self.scale = size, scale

        @classmethod
        def from_config(cls, cfg, scale):
            return cls(cfg.size, scale)

    recipe = OmegaConf.create({"model": {"part": {"type": "Part", "size": 3}}})
    part = build(table, recipe.model.part, scale=2)
    assert isinstance(part, Part) and (part.size, part.scale) == (3, 2)
    recipe.model.part.size = -1
    with pytest.raises(RecipeError, match=r"^model.part: size must be >= 0, got -1.$"):
        build(table, recipe.model.part, scale=2)
    recipe.model.part.type = "Prat"
    with pytest.raises(RecipeError, match=r"^model.part.type: unknown part type 'Prat'"):
        build(table, recipe.model.part, scale=2)
