"""Run a detector exported by ``python -m trainer.export`` with onnxruntime and numpy.

This file imports neither torch nor the rest of this package: a deployment can copy it next
to ``model.onnx`` and needs ``onnxruntime``, ``numpy`` and, to resize images, ``pillow``.

    model = OnnxMaskRCNN("export/model.onnx")
    result = model.predict(rgb_uint8_hwc, score_threshold=0.5)
    names = [model.class_names[label - 1] for label in result["labels"]]

The graph takes one image already resized by the recipe's rule (:meth:`resized_size`) as
uint8 RGB [3, h, w] and returns its detections in the resized image's pixels, with each
box's M x M mask probabilities; :meth:`postprocess` scales the boxes to the original size
and pastes the masks there, as the PyTorch model does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

OUTPUTS = ("boxes", "scores", "labels", "mask_probs")
INSTALL = "pip install onnxruntime  (or: pip install 'trainer[export]')"


class MissingDependencyError(ImportError):
    """A package that this feature needs and the environment lacks; says what to install."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            f"running an ONNX model needs onnxruntime, which is not installed: {INSTALL}"
        ) from None
    return onnxruntime


class OnnxMaskRCNN:
    """An exported detector in an onnxruntime session.

    Attributes: ``preprocessing`` (the resize rule, mean/std, mask threshold and paste),
    ``class_names`` (labels 1..K), ``classes`` (names, category ids, has_masks), ``recipe``
    (the training recipe as YAML text).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model '{self.path}' does not exist.")
        self.session = ort.InferenceSession(
            str(self.path), options, providers=providers or ["CPUExecutionProvider"]
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in ("preprocessing", "classes") if key not in metadata]
        if missing:
            raise ValueError(
                f"'{self.path}' is not an export of python -m trainer.export: its metadata "
                f"lacks {missing}."
            )
        self.preprocessing: dict[str, Any] = json.loads(metadata["preprocessing"])
        self.classes: dict[str, Any] = json.loads(metadata["classes"])
        self.class_names: list[str] = list(self.classes["names"])
        self.recipe: str | None = metadata.get("recipe")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The recipe's val resize: the shortest edge to ``min_size`` (the largest, when the
        recipe lists several), the longest at most ``max_size``; torchvision's rounding."""
        min_size = max(self.preprocessing["min_size"])
        max_size = self.preprocessing["max_size"]
        ratio = min(min_size / min(height, width), max_size / max(height, width))
        return int(height * ratio), int(width * ratio)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 RGB -> [3, h, w] uint8 resized by :meth:`resized_size` (PIL's
        bilinear filter, antialiased like torchvision's: pixels agree within one level)."""
        from PIL import Image

        height, width = image.shape[:2]
        size_h, size_w = self.resized_size(height, width)
        if (size_h, size_w) != (height, width):
            image = np.asarray(Image.fromarray(image).resize((size_w, size_h), Image.BILINEAR))
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The graph on one resized image, uint8 [3, h, w] -> ``boxes`` [D, 4] (its pixels),
        ``scores`` [D], ``labels`` [D] (1..K), ``mask_probs`` [D, M, M]; best first."""
        outputs = self.session.run(list(OUTPUTS), {"image": np.ascontiguousarray(image)})
        return dict(zip(OUTPUTS, outputs))

    def postprocess(
        self,
        raw: dict[str, np.ndarray],
        input_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> dict[str, np.ndarray]:
        """:meth:`run`'s outputs for an input of ``input_size`` -> ``boxes`` scaled to
        ``output_size`` (height, width), ``scores``, ``labels`` and ``masks`` bool [D, H, W]
        pasted there."""
        (in_h, in_w), (out_h, out_w) = input_size, output_size
        scale = np.array([out_w / in_w, out_h / in_h] * 2, dtype=np.float32)
        boxes = raw["boxes"] * scale
        threshold = self.preprocessing["mask_threshold"]
        if self.preprocessing["mask_paste"] == "torchvision":
            masks = paste_masks_torchvision(raw["mask_probs"], boxes, out_h, out_w, threshold)
        else:
            masks = paste_masks(raw["mask_probs"], boxes, out_h, out_w, threshold)
        return {"boxes": boxes, "scores": raw["scores"], "labels": raw["labels"], "masks": masks}

    def predict(self, image: np.ndarray, score_threshold: float = 0.5) -> dict[str, np.ndarray]:
        """H x W x 3 uint8 RGB -> its detections scoring at least ``score_threshold``:
        ``boxes`` [D, 4] xyxy in its pixels, ``scores``, ``labels`` (1..K), ``masks`` bool
        [D, H, W]."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"an image must be H x W x 3 uint8 (RGB), got {image.shape} {image.dtype}."
            )
        resized = self.resize(image)
        raw = self.run(resized)
        keep = raw["scores"] >= score_threshold
        raw = {key: value[keep] for key, value in raw.items()}
        return self.postprocess(raw, resized.shape[1:], image.shape[:2])


def _interpolation_weights(low, high, pixels: np.ndarray, size: int) -> np.ndarray:
    """[P, size] bilinear weights of the mask cells at pixel indices ``pixels``; zero
    outside the box (trainer.ops.masks, for one box)."""
    extent = np.float32(max(high - low, np.float32(1e-3)))
    u = (pixels + np.float32(0.5) - low) / extent * np.float32(size) - np.float32(0.5)
    cells = np.arange(size, dtype=np.float32)
    return np.clip(np.float32(1) - np.abs(u[:, None] - cells[None, :]), 0, None)


def _window(low, high, size: int, limit: int) -> tuple[int, int]:
    """First pixel and end of the span a pasted mask can reach: the box plus half a mask
    cell each side."""
    margin = (high - low) / np.float32(2 * size) + np.float32(1)
    start = int(np.clip(np.floor(low - margin), 0, limit))
    stop = int(np.clip(np.ceil(high + margin), 0, limit))
    return start, stop


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float
) -> np.ndarray:
    """[N, S, S] probabilities in boxes [N, 4] -> [N, height, width] bool: each pixel centre
    sampled bilinearly from the mask stretched over the exact box (Detectron2's paste, as
    ``trainer.ops.masks.paste_masks``), over the box's window only."""
    out = np.zeros((len(masks), height, width), dtype=bool)
    size = masks.shape[-1] if len(masks) else 0
    for mask, (x1, y1, x2, y2), target in zip(masks.astype(np.float32), boxes, out):
        x0, x_end = _window(x1, x2, size, width)
        y0, y_end = _window(y1, y2, size, height)
        if x_end <= x0 or y_end <= y0:
            continue
        weights_x = _interpolation_weights(x1, x2, np.arange(x0, x_end, dtype=np.float32), size)
        weights_y = _interpolation_weights(y1, y2, np.arange(y0, y_end, dtype=np.float32), size)
        target[y0:y_end, x0:x_end] = (weights_y @ mask) @ weights_x.T >= threshold
    return out


def _resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] float32 -> [height, width], bilinear with half-pixel centres (torch's
    ``interpolate(mode="bilinear", align_corners=False)``)."""

    def axis(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(in_size / out_size)
        source = np.maximum(
            (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
            0,
        )
        low = np.minimum(source.astype(np.int64), in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, (source - low).astype(np.float32)

    y_low, y_high, fy = axis(height, image.shape[0])
    x_low, x_high, fx = axis(width, image.shape[1])
    top = image[y_low][:, x_low] * (1 - fx) + image[y_low][:, x_high] * fx
    bottom = image[y_high][:, x_low] * (1 - fx) + image[y_high][:, x_high] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def paste_masks_torchvision(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float
) -> np.ndarray:
    """torchvision's ``paste_masks_in_image``: the mask padded by one cell, its box grown to
    match and cut to integer corners, the mask resized bilinearly to that box; then
    thresholded (> ``threshold``)."""
    out = np.zeros((len(masks), height, width), dtype=bool)
    if len(masks) == 0:
        return out
    size = masks.shape[-1]
    padded = np.pad(masks.astype(np.float32), ((0, 0), (1, 1), (1, 1)))
    scale = np.float32((size + 2) / size)
    boxes = boxes.astype(np.float32)
    half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    center_x = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    center_y = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    grown = np.stack(
        (center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h), 1
    ).astype(np.int64)  # truncation toward zero, as torch's cast
    for mask, (x1, y1, x2, y2), target in zip(padded, grown, out):
        box_w, box_h = max(int(x2 - x1 + 1), 1), max(int(y2 - y1 + 1), 1)
        resized = _resize_bilinear(mask, box_h, box_w)
        x_0, x_1 = max(x1, 0), min(x2 + 1, width)
        y_0, y_1 = max(y1, 0), min(y2 + 1, height)
        if x_1 > x_0 and y_1 > y_0:
            target[y_0:y_1, x_0:x_1] = resized[y_0 - y1 : y_1 - y1, x_0 - x1 : x_1 - x1] > threshold
    return out
