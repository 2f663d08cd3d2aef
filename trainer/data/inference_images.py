"""Images to detect in, from files or from memory, resized as the val transform does.

``trainer.predict`` and ``trainer.Detector`` both go through :func:`prepare_image`, so that
the same picture gives the same detections either way; files and PIL images are read by
:mod:`trainer.data.image_file`, as training and evaluation read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainer.data.image_file import pil_to_tensor, read_image
from trainer.data.transforms import build_transforms


def inference_transform(min_size: list[int], max_size: int) -> v2.Compose:
    """The val transform: shortest edge to ``min_size`` (``data.val.min_size``), longest at
    most ``max_size``."""
    return build_transforms(list(min_size), max_size, 0.0)


def to_image_tensor(image: Any) -> Tensor:
    """A path, PIL image, H x W x 3 uint8 numpy array or [3, H, W] tensor (uint8, or float in
    [0, 1]) -> uint8 [3, H, W]. Paths and PIL images are read as training reads files
    (:mod:`trainer.data.image_file`: EXIF orientation, 16 bits, alpha). Float images are
    rounded to 8 bits, the pixels the model was trained on, so that a picture gives the same
    detections in any of these forms."""
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file '{image}' does not exist.")
        return read_image(image)
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W], got {list(image.shape)}.")
        if image.is_floating_point():
            return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8)
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"a numpy image must be H x W x 3 uint8 (RGB), got {image.shape} {image.dtype}."
            )
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        return pil_to_tensor(image)
    raise TypeError(
        f"cannot read an image from a {type(image).__name__}: give a path, a PIL image, an "
        "H x W x 3 uint8 numpy array or a [3, H, W] tensor."
    )


def prepare_image(image: Tensor, transform: v2.Compose) -> Tensor:
    """[3, H, W] -> [3, h, w] resized by ``transform`` (the detection transforms expect a
    target: an empty one passes through unchanged)."""
    height, width = image.shape[-2:]
    empty = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8)),
    }
    resized, _ = transform(tv_tensors.Image(image), empty)
    return resized.as_subclass(Tensor)


class ImageFiles:
    """Dataset of image files. Item: (image resized by ``transform``; {"orig_size": (H, W),
    "original": uint8 [3, H, W], "file": Path})."""

    def __init__(self, files: list[Path], transform: v2.Compose):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = read_image(self.files[index])
        target = {
            "orig_size": tuple(image.shape[-2:]),
            "original": image,
            "file": self.files[index],
        }
        return prepare_image(image, self.transform), target
