"""The one image reader: training, evaluation and prediction turn files into pixels here, and
the checks before training size images with the same rules.

- **Orientation.** The EXIF orientation is applied: pixels and sizes are those of the image as
  viewers show it, which is how COCO annotations (and their width and height) are drawn. A
  PNG's EXIF counts when it comes before the pixel data, as browsers read it.
- **Bit depth.** 16-bit samples (PNG modes ``I;16``, and ``I``, read as 16-bit values) keep
  their high byte, ``v >> 8``: 0..65535 maps onto 0..255, as Pillow itself reads 16-bit
  colour PNGs, so a grey picture reads alike stored in 8 or 16 bits, grey or colour.
- **Channels.** Grey images (``1``, ``L``, ``LA``, 16-bit) give three equal channels; palette
  images their palette's colours; CMYK, YCbCr, LAB and HSV are converted to RGB.
- **Alpha** (RGBA, LA, PA, palette transparency) is ignored: the colour channels are used as
  stored, as torchvision, OpenCV and Pillow's ``convert("RGB")`` read them.

Other modes (32-bit float) are refused with a ValueError, by the checks before training too.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

# EXIF tag of the orientation; values 2..8 flip and turn the stored pixels for display.
ORIENTATION_TAG = 0x0112
# Orientations whose displayed image is the stored one turned on its side.
SIDEWAYS = (5, 6, 7, 8)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_GREY = ("1", "L", "LA")
_COLOUR = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


class ImageHeader(NamedTuple):
    """What the checks before training need from a file, without decoding its pixels."""

    height: int  # as displayed (EXIF orientation applied)
    width: int
    orientation: int  # EXIF orientation, 1 when none


def _open(source: Any) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    return Image.open(source)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 when there is none or it is not one of 1..8."""
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow finds a PNG's EXIF after the pixel data only by decoding them.
        return 1
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if value in range(1, 9) else 1


def _check_mode(mode: str) -> None:
    if mode not in _SIXTEEN_BIT + _GREY + _COLOUR:
        raise ValueError(
            f"image mode {mode} is not supported (8 or 16-bit grey, palette or colour images are)"
        )


def image_header(source: Any) -> ImageHeader:
    """Size (as displayed) and EXIF orientation of an image file from its header: a path,
    binary file object or bytes. Raises like :func:`read_image` for unreadable files and
    unsupported modes."""
    with _open(source) as image:
        _check_mode(image.mode)
        width, height = image.size
        orientation = _orientation(image)
    if orientation in SIDEWAYS:
        width, height = height, width
    return ImageHeader(height, width, orientation)


def _pixels(image: Image.Image) -> np.ndarray:
    """uint8 [H, W] (grey) or [H, W, 3], as stored."""
    mode = image.mode
    _check_mode(mode)
    if mode in _SIXTEEN_BIT:
        values = np.asarray(image)
        if mode == "I":
            values = values.clip(0, 65535)
        return (values >> 8).astype(np.uint8)
    if mode == "L" or mode == "RGB":
        return np.asarray(image)
    if mode in _GREY:
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def _oriented(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """[3, H, W] as stored -> as displayed (a view); ``ImageOps.exif_transpose``'s table."""
    if orientation == 2:
        return pixels[:, :, ::-1]
    if orientation == 3:
        return pixels[:, ::-1, ::-1]
    if orientation == 4:
        return pixels[:, ::-1, :]
    if orientation == 5:
        return pixels.transpose(0, 2, 1)
    if orientation == 6:
        return np.rot90(pixels, -1, axes=(1, 2))
    if orientation == 7:
        return pixels.transpose(0, 2, 1)[:, ::-1, ::-1]
    if orientation == 8:
        return np.rot90(pixels, 1, axes=(1, 2))
    return pixels


def _to_tensor(image: Image.Image, orientation: int) -> torch.Tensor:
    pixels = _pixels(image)
    if pixels.ndim == 2:
        pixels = np.broadcast_to(pixels, (3, *pixels.shape))
    else:
        pixels = pixels.transpose(2, 0, 1)
    # One copy into [3, H, W] order (numpy's is several times faster than torch's here).
    return torch.from_numpy(np.ascontiguousarray(_oriented(pixels, orientation)))


def read_image(source: Any) -> torch.Tensor:
    """An image file (path, binary file object or bytes) -> uint8 RGB [3, H, W] as displayed;
    see the module for the rules. Raises FileNotFoundError, ValueError for unsupported
    modes, OSError for files that do not decode."""
    try:
        with _open(source) as image:
            return _to_tensor(image, _orientation(image))
    except (OSError, ValueError):
        raise
    except Exception as exc:  # Pillow's plugins raise several kinds for damaged files
        raise OSError(f"cannot decode the image: {type(exc).__name__}: {exc}") from exc


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> uint8 RGB [3, H, W], by the same rules as files (its EXIF orientation
    too: an image that ``ImageOps.exif_transpose`` turned has none left)."""
    return _to_tensor(image, _orientation(image))
