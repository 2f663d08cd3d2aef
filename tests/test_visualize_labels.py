"""draw_instances on crowded and sparse scenes: labels sized and placed so that the objects
stay visible, and switched off on request."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.visualize import INSIDE_FRACTION, class_color, draw_instances

CROWD_SIZE = 512
CROWD_COUNT = 63
NAMES = ["circle", "square", "triangle"]


def droplet_frame(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A microscope-like 512x512 frame: 63 droplets of 10-20 px on a textured background.

    Returns the uint8 [3, H, W] image, bool [63, H, W] masks and float [63, 4] xyxy boxes.
    """
    rng = np.random.default_rng(seed)
    size = CROWD_SIZE
    # Texture: smooth blotches (coarse noise, bilinearly upsampled) over fine grain.
    coarse = torch.from_numpy(rng.normal(0, 1, (1, 1, 9, 9)))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0, 0]
    gray = 120 + 25 * smooth.numpy() + rng.normal(0, 6, (size, size))

    centres: list[tuple[float, float, float]] = []
    while len(centres) < CROWD_COUNT:
        radius = rng.uniform(5, 10)  # diameters of 10-20 px
        cy, cx = rng.uniform(radius + 2, size - radius - 2, 2)
        if all(math.hypot(cy - y, cx - x) > radius + r + 6 for y, x, r in centres):
            centres.append((cy, cx, radius))
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((CROWD_COUNT, size, size), bool)
    for k, (cy, cx, radius) in enumerate(centres):
        distance = np.hypot(yy - cy, xx - cx)
        masks[k] = distance <= radius
        # A droplet: bright core, dark rim, as under a microscope.
        gray[distance <= radius - 1.5] += 45
        gray[(distance > radius - 1.5) & (distance <= radius)] -= 50
    rgb = np.stack([gray * 0.92, gray, gray * 1.05]).clip(0, 255).astype(np.uint8)
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return (
        torch.from_numpy(rgb),
        torch.from_numpy(masks),
        torch.tensor(boxes, dtype=torch.float32),
    )


def _components(region: torch.Tensor) -> int:
    """Number of 4-connected regions of a bool [H, W] map."""
    todo = {tuple(p) for p in region.nonzero().tolist()}
    count = 0
    while todo:
        count += 1
        stack = [todo.pop()]
        while stack:
            y, x = stack.pop()
            for near in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if near in todo:
                    todo.remove(near)
                    stack.append(near)
    return count


def _outlines(boxes: torch.Tensor, height: int, width: int, line: int = 1) -> torch.Tensor:
    """bool [H, W]: the box edges, ``line`` px wide, as draw_instances clips them."""
    edges = torch.zeros(height, width, dtype=torch.bool)
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    for x1, y1, x2, y2 in boxes.long().tolist():
        ring = torch.zeros_like(edges)
        ring[y1 : y2 + 1, x1 : x2 + 1] = True
        ring[y1 + line : y2 + 1 - line, x1 + line : x2 + 1 - line] = False
        edges |= ring
    return edges


@pytest.fixture(scope="module")
def droplets():
    image, masks, boxes = droplet_frame()
    scores = torch.linspace(0.99, 0.51, CROWD_COUNT)
    return image, masks, boxes, torch.ones(CROWD_COUNT, dtype=torch.int64), scores


def test_crowded_small_objects_stay_visible_under_their_scores(droplets):
    image, masks, boxes, labels, scores = droplets
    drawn = draw_instances(image, boxes, labels, scores, masks, ["droplet"])
    bare = draw_instances(
        image, boxes, labels, scores, masks, ["droplet"], show_names=False, show_scores=False
    )
    text = (drawn != bare).any(0)
    objects = masks.any(0)
    # Opaque "droplet 0.87" boxes at each top-left corner used to hide 72% of the droplets'
    # pixels; now the scores sit beside the droplets.
    assert text[objects].float().mean() < 0.02
    per_droplet = (text & masks).flatten(1).sum(1) / masks.flatten(1).sum(1)
    assert per_droplet.max() <= INSIDE_FRACTION
    # Most droplets still get their score.
    assert _components(text) >= 50


def test_a_single_class_needs_no_name(droplets):
    image, masks, boxes, labels, scores = droplets
    # Ground truth of one class: nothing to write, only masks and outlines.
    truth = draw_instances(image, boxes, labels, None, masks, ["droplet"])
    changed = (truth != image).any(0)
    assert not (changed & ~masks.any(0) & ~_outlines(boxes, *image.shape[1:])).any()
    # Predictions: the score alone, whatever the class is called.
    named = draw_instances(image, boxes, labels, scores, masks, ["droplet"])
    renamed = draw_instances(image, boxes, labels, scores, masks, ["a much longer name"])
    assert torch.equal(named, renamed)
    # Asked for, the name is written.
    forced = draw_instances(image, boxes, labels, scores, masks, ["droplet"], show_names=True)
    assert not torch.equal(forced, named)


def test_labels_off_draws_no_text(droplets):
    image, masks, boxes, labels, scores = droplets
    labels = torch.arange(CROWD_COUNT) % 2 + 1
    names = ["droplet", "bubble"]
    bare = draw_instances(
        image, boxes, labels, scores, masks, names, show_names=False, show_scores=False
    )
    changed = (bare != image).any(0)
    assert not (changed & ~masks.any(0) & ~_outlines(boxes, *image.shape[1:])).any()
    # Scores off: names only, the same whatever the scores.
    names_only = draw_instances(image, boxes, labels, scores, masks, names, show_scores=False)
    other = draw_instances(image, boxes, labels, scores * 0.99, masks, names, show_scores=False)
    assert torch.equal(names_only, other) and not torch.equal(names_only, bare)
    # Names off: scores only, the same whatever the classes are called.
    scores_only = draw_instances(image, boxes, labels, scores, masks, names, show_names=False)
    renamed = draw_instances(image, boxes, labels, scores, masks, ["x", "y"], show_names=False)
    assert torch.equal(scores_only, renamed) and not torch.equal(scores_only, bare)


def test_crowded_boxes_without_masks(droplets):
    """Boxes only: the box stands for the object, and labels keep off the other boxes."""
    image, _, boxes, labels, scores = droplets
    drawn = draw_instances(image, boxes, labels, scores, None, ["droplet"])
    bare = draw_instances(image, boxes, labels, scores, None, ["droplet"], show_scores=False)
    text = (drawn != bare).any(0)
    inside = torch.zeros_like(text)
    for x1, y1, x2, y2 in boxes.long().tolist():
        inside[y1 : y2 + 1, x1 : x2 + 1] = True
    assert text[inside].float().mean() < 0.02
    assert _components(text) >= 50


def test_a_large_object_keeps_its_label_in_its_corner():
    image = torch.full((3, 300, 400), 100, dtype=torch.uint8)
    masks = torch.zeros(1, 300, 400, dtype=torch.bool)
    masks[0, 50:250, 60:340] = True
    boxes = torch.tensor([[60.0, 50.0, 340.0, 250.0]])
    drawn = draw_instances(image, boxes, torch.tensor([2]), torch.tensor([0.9]), masks, NAMES)
    bare = draw_instances(
        image, boxes, torch.tensor([2]), torch.tensor([0.9]), masks, NAMES, show_scores=False
    )
    text = (drawn != bare).any(0).nonzero()
    ys, xs = text[:, 0], text[:, 1]
    # Inside the box, at its top-left, small beside the object.
    assert ys.min() >= 50 and xs.min() >= 60 and ys.max() < 50 + 30 and xs.max() < 60 + 140
    assert len(text) / masks.sum() < 0.05


def _label_background(gray: int) -> tuple[int, ...]:
    """The most common colour of the label of a large object on a flat gray image."""
    image = torch.full((3, 300, 400), gray, dtype=torch.uint8)
    masks = torch.zeros(1, 300, 400, dtype=torch.bool)
    masks[0, 50:250, 60:340] = True
    args = (image, torch.tensor([[60.0, 50.0, 340.0, 250.0]]), torch.tensor([2]))
    drawn = draw_instances(*args, torch.tensor([0.9]), masks, NAMES)
    bare = draw_instances(*args, torch.tensor([0.9]), masks, NAMES, show_scores=False)
    pixels = drawn.permute(1, 2, 0)[(drawn != bare).any(0)]
    colors, counts = pixels.unique(dim=0, return_counts=True)
    return tuple(colors[counts.argmax()].tolist())


def test_label_background_lets_the_object_show_through():
    dark, light = _label_background(40), _label_background(220)
    assert dark != light
    assert class_color(2) not in (dark, light)
    # Brighter underneath, brighter label: the image shows through the label.
    assert all(d < v for d, v in zip(dark, light))
