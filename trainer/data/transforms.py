"""Training and test transforms on (image, target) pairs, from torchvision.transforms.v2.

v2 transforms move boxes and masks with the image, so they stay aligned under resizing
and flipping.
"""

from __future__ import annotations

from torchvision.transforms import v2


def build_transforms(min_size: list[int], max_size: int, flip_prob: float) -> v2.Compose:
    """Resize the shortest edge to one of ``min_size`` (random choice: multi-scale) while
    the longest stays <= ``max_size``; flip horizontally with ``flip_prob``; drop boxes
    that became empty. Inputs: uint8 image tv_tensor and a target with BoundingBoxes,
    Mask and labels."""
    steps = [v2.RandomShortestSize(list(min_size), max_size=max_size, antialias=True)]
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    steps.append(v2.SanitizeBoundingBoxes(min_size=1))
    return v2.Compose(steps)
