import pytest

from trainer.config import RecipeError
from trainer.data import DATASETS
from trainer.models import DETECTORS
from trainer.registry import Registry


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
