"""draw_instances: overlays against known pixel values."""

from __future__ import annotations

import pytest
import torch

from trainer.visualize import MASK_ALPHA, class_color, draw_instances

NAMES = ["circle", "square", "triangle"]
GRAY = 100


def _scene():
    """A flat gray 120x160 image, two instances with disjoint box-shaped masks."""
    image = torch.full((3, 120, 160), GRAY, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 70.0, 100.0], [90.0, 30.0, 150.0, 110.0]])
    masks = torch.zeros(2, 120, 160, dtype=torch.bool)
    masks[0, 20:100, 10:70] = True
    masks[1, 30:110, 90:150] = True
    return image, boxes, torch.tensor([1, 3]), masks


def _blend(label: int) -> torch.Tensor:
    color = torch.tensor(class_color(label), dtype=torch.float64)
    return (GRAY * (1 - MASK_ALPHA) + color * MASK_ALPHA).view(3, 1, 1)


def test_masks_boxes_and_threshold():
    image, boxes, labels, masks = _scene()
    before = image.clone()
    scores = torch.tensor([0.9, 0.3])
    out = draw_instances(image, boxes, labels, scores, masks, NAMES, score_threshold=0.5)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(image, before)  # drawn on a copy

    # Inside the first mask, below its label and inside its border: the class colour blended in.
    inside = out[:, 60:95, 15:65].double()
    assert (inside - _blend(1)).abs().max() <= 1
    # The second instance scores below the threshold: nothing of it is drawn.
    assert torch.equal(out[:, 30:111, 90:151], image[:, 30:111, 90:151])
    # Background away from the drawn instance is untouched.
    assert torch.equal(out[:, :, 75:], image[:, :, 75:])
    # The box outline (the bottom edge lies on y2 = 100) has the class colour.
    assert out[:, 100, 40].tolist() == list(class_color(1))

    # Without a threshold in the way, the second instance shows in its own colour.
    both = draw_instances(image, boxes, labels, scores, masks, NAMES, score_threshold=0.2)
    assert (both[:, 70:105, 95:145].double() - _blend(3)).abs().max() <= 1
    assert not torch.equal(_blend(1), _blend(3))


def test_class_name_and_score_are_written_in_the_label():
    image, boxes, labels, masks = _scene()
    scores = torch.tensor([0.9, 0.0])
    circle = draw_instances(image, boxes, labels, scores, masks, NAMES)
    other_name = draw_instances(image, boxes, labels, scores, masks, ["square", "x", "y"])
    other_score = draw_instances(image, boxes, labels, torch.tensor([0.6, 0.0]), masks, NAMES)
    for other in (other_name, other_score):
        differs = (circle != other).any(dim=0).nonzero()
        assert len(differs) > 10
        # Only the text differs, and it sits at the top of the box.
        ys, xs = differs[:, 0], differs[:, 1]
        assert ys.min() >= 20 - 20 and ys.max() < 20 + 20 and xs.min() >= 10 and xs.max() < 70
    # The text is dark on the class colour: some pixels in the label are near black.
    label_band = circle[:, 20:35, 10:70].int().sum(dim=0)
    assert (label_band < 150).any()


def test_ground_truth_without_scores_draws_everything():
    image, boxes, labels, masks = _scene()
    out = draw_instances(image, boxes, labels, None, masks, NAMES)
    assert (out[:, 60:95, 15:65].double() - _blend(1)).abs().max() <= 1
    assert (out[:, 70:105, 95:145].double() - _blend(3)).abs().max() <= 1
    # Boxes only (no masks): the inside stays gray, the outline is coloured.
    boxes_only = draw_instances(image, boxes, labels, None, None, NAMES)
    assert torch.equal(boxes_only[:, 60:95, 15:65], image[:, 60:95, 15:65])
    assert boxes_only[:, 100, 40].tolist() == list(class_color(1))


def test_nothing_to_draw_returns_the_image():
    image, boxes, labels, masks = _scene()
    low = draw_instances(image, boxes, labels, torch.tensor([0.1, 0.2]), masks, NAMES)
    assert torch.equal(low, image)
    empty = draw_instances(
        image,
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0),
        torch.zeros(0, 120, 160, dtype=torch.bool),
        NAMES,
    )
    assert torch.equal(empty, image)


def test_boxes_reaching_past_the_image_are_clipped():
    image, _, _, _ = _scene()
    boxes = torch.tensor([[-5.0, -5.0, 200.0, 130.0]])
    out = draw_instances(image, boxes, torch.tensor([2]), None, None, NAMES)
    assert out[:, 60, 0].tolist() == list(class_color(2))
    assert out[:, 60, 159].tolist() == list(class_color(2))


def test_bad_inputs_are_refused():
    image, boxes, labels, masks = _scene()
    with pytest.raises(ValueError, match="uint8"):
        draw_instances(image.float(), boxes, labels, None, masks, NAMES)
    with pytest.raises(ValueError, match="1..3"):
        draw_instances(image, boxes, torch.tensor([1, 4]), None, masks, NAMES)
    with pytest.raises(ValueError, match="bool"):
        draw_instances(image, boxes, labels, None, masks[:, :60], NAMES)


def test_class_colors_are_fixed_and_distinct():
    colors = [class_color(label) for label in range(1, 81)]
    assert colors == [class_color(label) for label in range(1, 81)]
    assert len(set(colors)) == 80
    for a, b in zip(colors, colors[1:]):  # neighbouring labels are easy to tell apart
        assert sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 > 60
