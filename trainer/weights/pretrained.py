"""A trained detector from its weights: the recipe, the classes and the model, each from the
weights' own folder when they carry it (this project's checkpoints do), else from what the
caller gives. Used by ``trainer.predict``, ``trainer.evaluate`` and ``trainer.Detector``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from trainer.config import RecipeError, load_recipe
from trainer.weights.classes import ModelClasses
from trainer.weights.source import SourceWeights
from trainer.weights.transfer import transfer_weights


def pretrained_recipe(
    weights: SourceWeights, recipe: str | Path | None = None, overrides: list[str] | None = None
) -> DictConfig:
    """``recipe`` when given, else the recipe stored with the weights, with ``overrides``."""
    if recipe is not None:
        return load_recipe(recipe, overrides)
    if weights.recipe_yaml is None:
        raise RecipeError(
            f"the weights in '{weights.path}' ({weights.format} format) carry no recipe: give "
            "the recipe that describes their model (e.g. recipes/mask_rcnn_torchvision.yaml "
            "for torchvision's)."
        )
    recipe_file = Path(weights.path).parent / "config.yaml"
    if recipe_file.is_file():
        return load_recipe(recipe_file, overrides)
    with tempfile.TemporaryDirectory() as folder:  # the recipe lives in the file's metadata
        recipe_file = Path(folder) / "config.yaml"
        recipe_file.write_text(weights.recipe_yaml)
        return load_recipe(recipe_file, overrides)


def classes_from_annotations(cfg: DictConfig) -> ModelClasses | None:
    """The categories of the recipe's annotation file (val, else train) sorted by id, the
    order that gave the model its labels 1..K; None when neither file exists. For weights
    saved without ``classes.json``."""
    from trainer.data.coco import read_coco_json

    for split in ("val", "train"):
        ann_file = Path(cfg.data[split].ann_file)
        if ann_file.is_file():
            table, segmentations = read_coco_json(ann_file)
            if not table.categories:
                raise RecipeError(f"{ann_file} has no categories to name the classes with.")
            has_masks = len(table.ann_ids) == 0 or bool(segmentations.present.any())
            return ModelClasses(list(table.categories.values()), list(table.categories), has_masks)
    return None


def pretrained_classes(
    weights: SourceWeights, cfg: DictConfig, classes: list[str] | None = None
) -> ModelClasses:
    """``classes`` when given, else the weights' own, else the recipe's annotation file's."""
    if classes is not None:
        return ModelClasses(list(classes))
    if weights.model_classes is not None:
        return weights.model_classes
    if weights.classes is not None:
        return ModelClasses(list(weights.classes))
    found = classes_from_annotations(cfg)
    if found is None:
        raise RecipeError(
            f"the weights in '{weights.path}' do not name their classes, and neither "
            f"data.val.ann_file '{cfg.data.val.ann_file}' nor data.train.ann_file "
            f"'{cfg.data.train.ann_file}' exists: give the class names (classes=[...]), or "
            "point data.val.ann_file at the annotation file the model was trained with."
        )
    return found


def build_pretrained(
    weights: SourceWeights, cfg: DictConfig, classes: ModelClasses, compile_inference: bool = True
) -> nn.Module:
    """The recipe's detector for ``classes`` with ``weights`` loaded, in eval mode; every
    tensor of the model must come from them (a CheckpointError lists what does not fit).
    Compiled for inference when the recipe's ``model.compile_inference`` says so, unless
    ``compile_inference`` is False (for exporting or converting the weights)."""
    from trainer.engine.checkpoint import CheckpointError
    from trainer.models import build_detector

    model = build_detector(cfg.model, num_classes=len(classes.names))
    # Rows in the weights' own order: ``classes`` renames them, it does not pick rows.
    source = SourceWeights(weights.state_dict, None, weights.format, weights.path)
    report = transfer_weights(model, source, classes.names)
    if report.missing or report.reinitialised:
        raise CheckpointError(
            f"weights in '{weights.path}' do not fit the model built from the recipe: "
            f"{len(report.missing)} missing (e.g. {report.missing[:3]}), "
            f"{len(report.reinitialised)} of another shape (e.g. {report.reinitialised[:2]})."
        )
    model.eval()
    if compile_inference and cfg.model.compile_inference:
        from trainer.models import compile_for_inference

        compile_for_inference(model)
    return model
