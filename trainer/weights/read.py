"""``read_weights(source)``: detector weights from a path, URL or Hub repo, in any supported
format, renamed to this project's parameter names (:class:`SourceWeights`).

Formats, told apart by the file and its keys:

- this project: a work_dir (its latest checkpoint), a checkpoint folder, ``model.safetensors``
  or a ``.pth`` of our state dict; the class names and recipe come from the folder
  (``classes.json``, ``config.yaml``) or the safetensors metadata;
- torchvision: a ``maskrcnn_resnet50_fpn`` state dict (``.pth``, also nested under "model");
- detectron2: a model-zoo ``.pkl`` (restricted unpickler) or a ``DetectionCheckpointer`` ``.pth``;
- mmdetection 2.x / 3.x: a ``.pth`` with "state_dict" and "meta".

Every ``.pth`` is read with ``torch.load(weights_only=True)``: no file runs code.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.engine.checkpoint import RECIPE_FILE, resolve_weights
from trainer.engine.logging import get_logger
from trainer.weights.classes import ModelClasses
from trainer.weights.source import SourceWeights

FORMATS = ("trainer", "torchvision", "detectron2", "mmdet")
# A key only this project's state dicts have.
OUR_CLASSIFIER = "roi_heads.box_head.cls_score.weight"
# owner/name as the Hub spells repo ids.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def locate(source: str | Path) -> Path:
    """A local path, an http(s) URL (downloaded once into torch's hub cache) or a Hugging Face
    Hub repo id (``owner/name``, downloaded by huggingface_hub) -> a local path."""
    text = str(source)
    if Path(text).exists():
        return Path(text)
    if urlparse(text).scheme in ("http", "https"):
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        file = folder / Path(urlparse(text).path).name
        if not file.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            get_logger().info("downloading %s to %s", text, file)
            torch.hub.download_url_to_file(text, str(file), progress=True)
        return file
    if HUB_REPO_ID.match(text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id=text))
        except Exception as exc:  # offline, no such repo, no access: all say the same here
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FileNotFoundError(
                f"weights '{text}': no such file or folder here, and no Hugging Face Hub repo "
                f"of that id could be downloaded ({reason})."
            ) from None
    raise FileNotFoundError(
        f"weights '{text}' not found: give a work_dir, a checkpoint folder, a weights file, "
        "an http(s) URL or a Hugging Face Hub repo id (owner/name)."
    )


def read_weights(source: str | Path, format: str | None = None) -> SourceWeights:
    """Read detector weights from ``source`` (see :func:`locate`); ``format`` forces one of
    :data:`FORMATS` instead of telling it from the file."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}.")
    path = locate(source)
    if path.is_dir() or path.suffix == ".safetensors":
        return read_trainer_weights(path)
    if path.suffix == ".pkl":
        from trainer.weights.detectron2 import from_detectron2, read_detectron2_pkl

        return from_detectron2(read_detectron2_pkl(path), str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read '{path}' as a weights-only torch file ({_load_failure(exc)}). Files "
            "that need code to unpickle are refused: save a plain state dict "
            "(model.state_dict()); for an mmdetection training checkpoint, keep its "
            '"state_dict" and "meta" (its tools/model_converters/publish_model.py).'
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"'{path}' holds a {type(checkpoint).__name__}, not a state dict.")
    return from_checkpoint_dict(checkpoint, str(path), format)


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words: the global it refused
    (e.g. an mmengine ``HistoryBuffer`` in a training checkpoint) when that was the cause."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if refused:
        return f"it holds {refused.group(1)}, which is not plain data"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def from_checkpoint_dict(checkpoint: dict, path: str, format: str | None = None) -> SourceWeights:
    """A loaded ``.pth`` -> SourceWeights, its format told from its keys (or ``format``)."""
    state = checkpoint.get("model", checkpoint)
    if format == "trainer" or (format is None and OUR_CLASSIFIER in state):
        return SourceWeights(dict(state), None, "trainer", path)
    from trainer.weights.torchvision import from_torchvision, is_torchvision

    if format == "torchvision" or (format is None and is_torchvision(checkpoint)):
        return from_torchvision(checkpoint, path)
    from trainer.weights.mmdet import from_mmdet, is_mmdet

    if format == "mmdet" or (format is None and is_mmdet(checkpoint)):
        return from_mmdet(checkpoint, path)
    from trainer.weights.detectron2 import from_detectron2, is_detectron2

    if format == "detectron2" or (format is None and is_detectron2(checkpoint)):
        return from_detectron2(checkpoint, path)
    raise ValueError(
        f"'{path}' is not a Mask R-CNN checkpoint this project reads (this project's, "
        "torchvision's, detectron2's or mmdetection's); its first keys: "
        f"{list(state)[:5]}."
    )


def read_trainer_weights(path: Path) -> SourceWeights:
    """This project's weights: the file (EMA preferred), its classes and recipe."""
    file = resolve_weights(path)
    if file.suffix == ".safetensors":
        state = load_file(str(file))
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata() or {}
    else:
        return from_checkpoint_dict(
            torch.load(file, map_location="cpu", weights_only=True), str(file), "trainer"
        )
    classes = ModelClasses.load(file.parent)
    if classes is None and "classes" in metadata:
        classes = ModelClasses.from_json(metadata["classes"], f"{file} metadata")
    recipe = file.parent / RECIPE_FILE
    recipe_yaml = recipe.read_text() if recipe.is_file() else metadata.get("recipe")
    return SourceWeights(
        state,
        classes.names if classes else None,
        "trainer",
        str(file),
        recipe_yaml=recipe_yaml,
        model_classes=classes,
    )
