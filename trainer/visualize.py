"""Instance overlays: masks, boxes, class names and scores drawn onto an image.

Used by ``trainer.predict`` (overlay PNGs), ``trainer.tools.browse_dataset`` (ground truth after
the training transforms) and the val phase (overlays sent to trackers).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# Golden-ratio hue steps give neighbouring labels far-apart hues for any number of classes.
_GOLDEN_RATIO = 0.618033988749895
MASK_ALPHA = 0.5


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


def draw_instances(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    masks: Tensor | None,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
) -> Tensor:
    """Draw instances onto a copy of ``image``.

    Args:
        image: uint8 [3, H, W].
        boxes: [N, 4] xyxy pixels.
        labels: [N] int in 1..K; ``class_names[label - 1]`` is the name shown.
        scores: [N] or None (ground truth: every instance is drawn, no score shown).
        masks: bool [N, H, W] or None.
        class_names: the K class names.
        score_threshold: instances scoring below it are left out.
    Returns:
        uint8 [3, H, W]: masks blended in the class colour, boxes, and "name score" labels.
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
    colors = [class_color(label) for label in labels.tolist()]
    if masks is not None:
        masks = masks.detach().cpu()[keep]
        if masks.dtype != torch.bool or tuple(masks.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(
                f"masks must be bool [N, {image.shape[1]}, {image.shape[2]}], "
                f"got {masks.dtype} {list(masks.shape)}"
            )
        image = draw_segmentation_masks(image, masks, alpha=MASK_ALPHA, colors=colors)

    names = [class_names[label - 1] for label in labels.tolist()]
    if scores is not None:
        names = [f"{name} {score:.2f}" for name, score in zip(names, scores[keep].tolist())]
    height, width = image.shape[1:]
    # Lines and text grow with the image: readable at 150 px and at 1333 px alike.
    side = min(height, width)
    # draw_bounding_boxes requires x1 <= x2 and y1 <= y2 inside the image.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    return draw_bounding_boxes(
        image,
        boxes,
        labels=names,
        colors=colors,
        width=max(1, side // 200),
        font=_font_file(),
        font_size=max(9, side // 40),
        fill_labels=True,
    )
