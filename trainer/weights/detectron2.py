"""detectron2 Mask R-CNN (R50-FPN) checkpoints, renamed to this project's keys.

Model-zoo files are pickles, ``{"model": {name: numpy array}, "__author__": ...}``, read
here by an unpickler that builds numpy arrays and plain containers only and refuses every
other global: such a file cannot run code. ``DetectionCheckpointer`` ``.pth`` files are
``{"model": {name: tensor}, ...}``, read with ``torch.load(weights_only=True)``.

detectron2 puts the background LAST in its classifier and has no background slot in its
class-specific box regression: both are reordered into this project's layout. Its model-zoo
ResNets are MSRA/Caffe2 ones, fed BGR images in 0..255: recipes/mask_rcnn_detectron2.yaml
sets ``stride_in_1x1`` and the matching mean/std, and the stem conv's input channels are
flipped here so that the model reads RGB like every other one of this project.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from trainer.weights.classes import ModelClasses
from trainer.weights.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES
from trainer.weights.source import SourceWeights, background_last_to_first

# What a pickle of numpy arrays in dicts needs, and nothing that can run code: numpy's
# array and scalar rebuilders (numpy 1 and 2 module names; _frombuffer from pickle protocol
# 5), _codecs.encode (bytes in protocols 0-2) and builtins that are data.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    *(("builtins", name) for name in ("set", "frozenset", "bytearray", "complex", "slice")),
}

# (detectron2 pattern, our replacement): the first match wins.
NAME_TABLE: list[tuple[str, str]] = [
    (r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.body.bn1."),
    (r"^backbone\.bottom_up\.stem\.conv1\.", "backbone.body.conv1."),
    (
        r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.",
        "backbone.body.layer{stage}.{1}.downsample.1.",
    ),
    (
        r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.",
        "backbone.body.layer{stage}.{1}.downsample.0.",
    ),
    (
        r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.",
        "backbone.body.layer{stage}.{1}.bn{2}.",
    ),
    (
        r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.",
        "backbone.body.layer{stage}.{1}.conv{2}.",
    ),
    (r"^backbone\.fpn_lateral(\d)\.", "fpn.fpn.inner_blocks.{level}.0."),
    (r"^backbone\.fpn_output(\d)\.", "fpn.fpn.layer_blocks.{level}.0."),
    (r"^proposal_generator\.rpn_head\.conv\.", "rpn.head.conv."),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", "rpn.head.objectness."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", "rpn.head.deltas."),
    (r"^roi_heads\.box_head\.fc(\d)\.", "roi_heads.box_head.fc{0}."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_heads.box_head.cls_score."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_heads.box_head.bbox_pred."),
    # mask_fcn<i> (1..4) is our convs.<2 (i - 1)> (each conv is followed by its ReLU).
    (r"^roi_heads\.mask_head\.mask_fcn(\d)\.", "roi_heads.mask_head.convs.{conv}."),
    (r"^roi_heads\.mask_head\.deconv\.", "roi_heads.mask_head.upsample."),
    (r"^roi_heads\.mask_head\.predictor\.", "roi_heads.mask_head.predictor."),
]
STEM = "backbone.body.conv1.weight"


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, file, path: str | Path):
        super().__init__(file, encoding="latin1")  # Python 2 pickles' str: bytes as text
        self.path = path

    def find_class(self, module: str, name: str):
        # Python 2 pickles name builtins "__builtin__"; the base class maps such names, so the
        # check is on the mapped one.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise ValueError(
            f"'{self.path}' is not a plain pickle of arrays: refused global {module}.{name} "
            "(building it could run code)."
        )


def read_detectron2_pkl(path: str | Path) -> dict:
    """A model-zoo ``.pkl`` -> its dict (``{"model": {name: np.ndarray}, ...}``), built
    from numpy arrays and plain containers only; any other global is a ValueError naming
    the file and the global, raised before it is looked up."""
    try:
        with open(path, "rb") as file:
            data = _ArraysOnly(file, path).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"'{path}' is not a readable pickle ({exc or 'truncated'}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' holds a {type(data).__name__}, not a dict of weights.")
    return data


def is_detectron2(checkpoint: dict) -> bool:
    state = checkpoint.get("model", checkpoint)
    return isinstance(state, dict) and any(
        k.startswith(("proposal_generator.", "backbone.bottom_up.")) for k in state
    )


def rename(key: str) -> str | None:
    """detectron2 key -> ours, or None when it has no counterpart."""
    for pattern, replacement in NAME_TABLE:
        match = re.match(pattern, key)
        if match:
            groups = match.groups()
            first = int(groups[0]) if groups else 0
            return (
                replacement.format(*groups, stage=first - 1, level=first - 2, conv=2 * (first - 1))
                + key[match.end() :]
            )
    return None


def from_detectron2(checkpoint: dict, path: str) -> SourceWeights:
    """A detectron2 checkpoint (from a ``.pkl`` or a ``.pth``) -> SourceWeights."""
    state, unused = {}, []
    for key, value in checkpoint.get("model", checkpoint).items():
        ours = rename(key)
        if ours is None:
            unused.append(key)
            continue
        # np.array copies: arrays from a pickle may be read-only views of its bytes.
        tensor = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
        state[ours] = torch.as_tensor(tensor)
    if not state:
        raise ValueError(
            f"'{path}' has no detectron2 parameter names (its first keys: {unused[:3]}); "
            "Caffe2 / Detectron1 pickles (res2_0_branch2a_w ...) are not read."
        )
    if STEM in state:
        state[STEM] = state[STEM].flip(1)  # BGR -> RGB input channels
    num_classes = background_last_to_first(state, path)
    classes = list(COCO_CLASSES) if num_classes == len(COCO_CLASSES) else None
    weights = SourceWeights(state, classes, "detectron2", path, unused)
    if classes == COCO_CLASSES:  # results then carry COCO's own category ids
        weights.model_classes = ModelClasses(classes, list(COCO_CATEGORY_IDS))
    return weights
