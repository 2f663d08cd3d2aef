"""Training and test transforms on (image, target) pairs, from torchvision.transforms.v2.

v2 transforms move boxes and masks with the image, so they stay aligned under resizing,
cropping, padding and flipping. Targets without ``masks`` (boxes-only data) pass through the
same transforms.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

# Padding colour for large-scale jitter: the ImageNet mean, which normalizes to ~0 for most
# backbones, like the model's own batch padding (as torchvision's detection references do).
PAD_COLOUR = (124, 116, 104)


class BoxesFromMasks(v2.Transform):
    """Set each box to the extent of its mask (pixel edges: the last row and column are inside).

    After a crop cuts an instance, its clipped box may keep corners the object no longer
    reaches; its mask's extent is tight. An instance cut away entirely gets an empty box, which
    ``SanitizeBoundingBoxes`` then drops with its label and mask. Targets without masks keep
    their (clipped) boxes.
    """

    def forward(self, *inputs: Any) -> Any:
        image, target = inputs
        masks = target.get("masks")
        if masks is None or len(masks) == 0:
            return image, target
        boxes = masks_to_boxes(masks)
        boxes[masks.flatten(1).amax(1) > 0, 2:] += 1
        return image, {**target, "boxes": tv_tensors.wrap(boxes, like=target["boxes"])}


def build_transforms(
    min_size: list[int],
    max_size: int,
    flip_prob: float,
    lsj_size: int | None = None,
    lsj_scale: tuple[float, float] = (0.1, 2.0),
    color_jitter: float = 0.0,
) -> v2.Compose:
    """Transforms for (uint8 image tv_tensor, target with BoundingBoxes, labels and
    optionally Mask).

    Resize: the shortest edge to one of ``min_size`` (random choice: multi-scale) with the
    longest <= ``max_size``; or, with ``lsj_size``, large-scale jitter: scale to fit an
    ``lsj_size`` square times a random factor in ``lsj_scale``, then crop or pad (at a random
    place) to that square, boxes recomputed from masks. Then flip horizontally with
    ``flip_prob``, scale brightness, contrast and saturation by random factors in
    [1 - ``color_jitter``, 1 + ``color_jitter``], and drop instances whose box became empty.
    """
    if lsj_size is None:
        steps: list[Any] = [
            v2.RandomShortestSize(list(min_size), max_size=max_size, antialias=True)
        ]
    else:
        steps = [
            v2.ScaleJitter((lsj_size, lsj_size), scale_range=tuple(lsj_scale), antialias=True),
            v2.RandomCrop(
                (lsj_size, lsj_size),
                pad_if_needed=True,
                fill={tv_tensors.Image: PAD_COLOUR, "others": 0},
            ),
            BoxesFromMasks(),
        ]
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    if color_jitter > 0:
        steps.append(
            v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
        )
    steps.append(v2.SanitizeBoundingBoxes(min_size=1))
    return v2.Compose(steps)


def transforms_from_config(cfg: DictConfig, train: bool) -> v2.Compose:
    """``data.train`` / ``data.val`` node -> :func:`build_transforms`; flips and jitters only
    for training (``train``)."""
    return build_transforms(
        list(cfg.min_size),
        cfg.max_size,
        cfg.flip_prob if train else 0.0,
        lsj_size=cfg.lsj_size if train else None,
        lsj_scale=tuple(cfg.lsj_scale),
        color_jitter=cfg.color_jitter if train else 0.0,
    )
