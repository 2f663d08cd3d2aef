"""Instance overlays: masks, boxes, class names and scores drawn onto an image.

Used by ``trainer.predict`` (overlay PNGs), ``trainer.tools.browse_dataset`` (ground truth after
the training transforms) and the val phase (overlays sent to trackers).

Labels are meant to stay out of the way of what they name: sized to their object, on a
see-through background, inside the box only where they hide a small part of the object, else
beside it, and left out where they would hide other objects (a crowd of small objects keeps
its masks and outlines in sight). A single-class set gets no names, only scores.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_segmentation_masks

# Golden-ratio hue steps give neighbouring labels far-apart hues for any number of classes.
_GOLDEN_RATIO = 0.618033988749895
MASK_ALPHA = 0.5
# Opacity of a label's background: the mask and outline under it still show.
LABEL_ALPHA = 0.6
# Smallest text drawn (px); a label at this size too large for its object goes beside it.
MIN_FONT_SIZE = 8
# Text size as a share of the object's size (square root of its box area), before the
# image-size cap.
OBJECT_FONT_RATIO = 0.5
# Most of its own object (mask, or box without masks) that a label inside its box may hide.
INSIDE_FRACTION = 0.2
# Most of any other object that labels may hide, all labels together.
OTHERS_FRACTION = 0.05
# Space between a label's text and the edge of its background (px).
LABEL_PAD = 1


def class_color(label: int) -> tuple[int, int, int]:
    """Deterministic RGB colour of a label (1..K); consecutive labels get distinct hues."""
    hue = (0.1 + label * _GOLDEN_RATIO) % 1.0
    # Alternate the brightness too, so classes whose hues come close still differ.
    value = 0.95 if label % 2 else 0.75
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, value)
    return round(255 * red), round(255 * green), round(255 * blue)


@cache
def _font_file() -> str:
    """A TrueType font, so label text can be sized to the image. Matplotlib ships DejaVu
    Sans on every platform; PIL's built-in font has one small size only."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_file(), size)


def draw_instances(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    masks: Tensor | None,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    *,
    show_names: bool | None = None,
    show_scores: bool = True,
) -> Tensor:
    """Draw instances onto a copy of ``image``.

    Each instance gets its mask blended in its class colour, its box outline and a label
    ("name score"). Labels are sized to their object and placed so that they hide little:
    inside the box's top-left corner when they cover at most :data:`INSIDE_FRACTION` of the
    object, else just outside the box where no other object or label lies, else left out.
    Their background is semi-transparent, so masks and outlines show through.

    Args:
        image: uint8 [3, H, W].
        boxes: [N, 4] xyxy pixels.
        labels: [N] int in 1..K; ``class_names[label - 1]`` is the name shown.
        scores: [N] or None (ground truth: every instance is drawn, no score shown).
        masks: bool [N, H, W] or None.
        class_names: the K class names.
        score_threshold: instances scoring below it are left out.
        show_names: write class names; by default only when there is more than one class
            (the colour tells the class, and a single class needs no name).
        show_scores: write scores (when ``scores`` is given). With neither names nor
            scores, no label is drawn.
    Returns:
        uint8 [3, H, W].
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}")
    image = image.detach().cpu()
    boxes = boxes.detach().cpu().float().reshape(-1, 4)
    labels = labels.detach().cpu().long().reshape(-1)
    if len(labels) and (labels.min() < 1 or labels.max() > len(class_names)):
        raise ValueError(
            f"labels must be in 1..{len(class_names)} (one per class name), "
            f"got {sorted(set(labels.tolist()))}"
        )
    keep = torch.ones(len(labels), dtype=torch.bool)
    if scores is not None:
        scores = scores.detach().cpu().float().reshape(-1)
        keep = scores >= score_threshold
    if not keep.any():
        return image.clone()

    boxes, labels = boxes[keep], labels[keep]
    scores = scores[keep] if scores is not None else None
    colors = [class_color(label) for label in labels.tolist()]
    if masks is not None:
        masks = masks.detach().cpu()[keep]
        if masks.dtype != torch.bool or tuple(masks.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(
                f"masks must be bool [N, {image.shape[1]}, {image.shape[2]}], "
                f"got {masks.dtype} {list(masks.shape)}"
            )
        image = draw_segmentation_masks(image, masks, alpha=MASK_ALPHA, colors=colors)

    height, width = image.shape[1:]
    # Outlines go on the pixels at the box edges, so they must lie inside the image.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    corners = boxes.long().tolist()
    line_widths = _line_widths(corners, min(height, width))

    canvas = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas, "RGBA")
    for corner, color, line_width in zip(corners, colors, line_widths, strict=True):
        draw.rectangle(corner, outline=color, width=line_width)

    if show_names is None:
        show_names = len(class_names) > 1
    texts = [[] for _ in corners]
    if show_names:
        for text, label in zip(texts, labels.tolist(), strict=True):
            text.append(class_names[label - 1])
    if show_scores and scores is not None:
        for text, score in zip(texts, scores.tolist(), strict=True):
            text.append(f"{score:.2f}")
    if any(texts):
        order = range(len(corners)) if scores is None else scores.argsort(descending=True)
        placer = _LabelPlacer(corners, masks, line_widths, height, width)
        for index in [int(i) for i in order]:
            text = " ".join(texts[index])
            placed = placer.place(index, text)
            if placed is not None:
                rect, font, origin = placed
                draw.rectangle(rect, fill=(*colors[index], round(255 * LABEL_ALPHA)))
                draw.text(origin, text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def _line_widths(corners: list[list[int]], side: int) -> list[int]:
    """Outline width per box: grows with the image (readable at 150 px and at 1333 px
    alike), but 1 px around objects so small that a thick outline would cover them."""
    thick = max(1, side // 200)
    return [thick if min(x2 - x1, y2 - y1) >= 16 * thick else 1 for x1, y1, x2, y2 in corners]


class _LabelPlacer:
    """Finds each label a place where it hides little: in its own box's corner when it covers
    a small part of the object, else just outside the box; never over another label, and
    never hiding more than a small part of any other object."""

    def __init__(
        self,
        corners: list[list[int]],
        masks: Tensor | None,
        line_widths: list[int],
        height: int,
        width: int,
    ):
        self.corners = np.asarray(corners, dtype=np.int64).reshape(-1, 4)
        self.masks = masks.numpy() if masks is not None else None
        self.line_widths = line_widths
        self.height, self.width = height, width
        self.side = min(height, width)
        x1, y1, x2, y2 = self.corners.T
        # Without masks a box stands for its object: its pixels, outline included.
        box_areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        self.areas = box_areas if masks is None else self.masks.sum((1, 2))
        self.areas = np.maximum(self.areas, 1)
        # Pixels of each object under the labels of other objects placed so far.
        self.hidden = np.zeros(len(corners), np.int64)
        self.taken = np.zeros((height, width), bool)

    def _font_size(self, index: int) -> int:
        """Text height follows the image size, capped by the object's size: a label far
        larger than its object hides it, or reads as belonging to something else."""
        x1, y1, x2, y2 = self.corners[index].tolist()
        base = max(MIN_FONT_SIZE + 1, self.side // 40)
        size = OBJECT_FONT_RATIO * ((x2 - x1 + 1) * (y2 - y1 + 1)) ** 0.5
        return int(min(base, max(MIN_FONT_SIZE, round(size))))

    def _covered(self, kx: int, ky: int, w: int, h: int) -> np.ndarray:
        """Pixels of each object under the rectangle (left kx, top ky, w x h)."""
        x1, y1, x2, y2 = self.corners.T
        overlap_w = np.minimum(x2 + 1, kx + w) - np.maximum(x1, kx)
        overlap_h = np.minimum(y2 + 1, ky + h) - np.maximum(y1, ky)
        covered = np.maximum(overlap_w, 0) * np.maximum(overlap_h, 0)
        if self.masks is not None:
            for j in np.nonzero(covered)[0]:
                covered[j] = self.masks[j, ky : ky + h, kx : kx + w].sum()
        return covered

    def place(
        self, index: int, text: str
    ) -> tuple[list[int], ImageFont.FreeTypeFont, tuple[int, int]] | None:
        """``(rectangle, font, text origin)`` for the label of instance ``index``, or None
        where it fits nowhere without hiding an object."""
        font = _font(self._font_size(index))
        left, top, right, bottom = font.getbbox(text)
        w, h = right - left + 2 * LABEL_PAD, bottom - top + 2 * LABEL_PAD
        x1, y1, x2, y2 = self.corners[index].tolist()
        lw = self.line_widths[index]
        # (left, top, share of its own object the label may hide there)
        candidates = [
            (x1, y1 - h, OTHERS_FRACTION),  # above the box
            (x2 + 1, y1, OTHERS_FRACTION),  # right of it, at the top
            (x1, y2 + 1, OTHERS_FRACTION),  # below it
            (x1 - w, y1, OTHERS_FRACTION),  # left of it, at the top
        ]
        if w <= x2 - x1 + 1 - 2 * lw and h <= y2 - y1 + 1 - 2 * lw:
            # Inside, in the top-left corner: where a label is read as its object's.
            candidates.insert(0, (x1 + lw, y1 + lw, INSIDE_FRACTION))
        for kx, ky, own_limit in candidates:
            kx = min(max(kx, 0), self.width - w)  # slid along the edge into the image
            if kx < 0 or ky < 0 or ky + h > self.height:
                continue
            if self.taken[ky : ky + h, kx : kx + w].any():
                continue
            covered = self._covered(kx, ky, w, h)
            own = covered[index]
            covered[index] = 0
            if own > own_limit * self.areas[index]:
                continue
            if ((covered > 0) & (self.hidden + covered > OTHERS_FRACTION * self.areas)).any():
                continue
            self.hidden += covered
            self.taken[ky : ky + h, kx : kx + w] = True
            origin = (kx + LABEL_PAD - left, ky + LABEL_PAD - top)
            return [kx, ky, kx + w - 1, ky + h - 1], font, origin
        return None
