import torch
from torchvision import tv_tensors

from trainer.data.transforms import build_transforms


def sample(height=60, width=90):
    """An image whose red channel is exactly the union of two rectangular masks."""
    boxes = torch.tensor([[10.0, 5.0, 40.0, 30.0], [50.0, 20.0, 85.0, 55.0]])
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
        mask[y1:y2, x1:x2] = 1
        image[0, y1:y2, x1:x2] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([1, 2]),
        "masks": tv_tensors.Mask(masks),
    }
    return tv_tensors.Image(image), target


def mask_extent(mask: torch.Tensor) -> list[float]:
    ys, xs = mask.nonzero(as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_random_resize_and_flip_keep_image_boxes_and_masks_aligned():
    transforms = build_transforms([45, 120, 200], max_size=250, flip_prob=0.5)
    torch.manual_seed(0)
    flipped_seen = set()
    for _ in range(12):
        image, target = transforms(*sample())
        h, w = image.shape[-2:]
        assert min(h, w) in (45, 120, 166) and max(h, w) <= 250  # 200 capped by max_size
        assert target["masks"].shape[-2:] == (h, w)
        for box, mask in zip(target["boxes"], target["masks"]):
            # the box is the mask's extent, to within the resize's rounding
            torch.testing.assert_close(
                box, torch.tensor(mask_extent(mask), dtype=torch.float32), atol=1.5, rtol=0
            )
        # the image still shows the objects where the masks are
        red = image[0] > 127
        union = target["masks"].bool().any(0)
        # (only edge pixels may differ: antialiased image vs nearest-neighbour masks)
        assert (red == union).float().mean() > 0.95
        flipped_seen.add(target["boxes"][0, 0].item() > w / 2)
    assert flipped_seen == {True, False}


def test_test_transform_is_deterministic_and_shortest_edge():
    transforms = build_transforms([120], max_size=1000, flip_prob=0.0)
    image, target = transforms(*sample())
    assert image.shape[-2:] == (120, 180)
    torch.testing.assert_close(target["boxes"][0], torch.tensor([20.0, 10.0, 80.0, 60.0]))


def test_boxes_that_vanish_are_dropped_with_their_masks_and_labels():
    image, target = sample()
    target["boxes"] = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 5.0, 40.0, 30.0], [50.0, 20.0, 50.2, 55.0]]),
        format="XYXY",
        canvas_size=(60, 90),
    )
    _, out = build_transforms([60], max_size=1000, flip_prob=0.0)(image, target)
    assert out["labels"].tolist() == [1] and out["masks"].shape[0] == 1
