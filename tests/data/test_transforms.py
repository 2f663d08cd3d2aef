import torch
from torchvision import tv_tensors

from trainer.data.transforms import PAD_COLOUR, BoxesFromMasks, build_transforms


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


def coloured_sample(height=60, width=90):
    """Instance 1 is red, instance 2 blue, on a green background; masks are their pixels and
    the first is a triangle, so a crop through it leaves a mask narrower than its clipped box."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[1] = 255
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    masks[0] = (xs >= 10) & (xs < 50) & (ys >= 5) & (ys < 45) & (xs - 10 < 45 - ys)
    masks[1, 20:55, 55:85] = 1
    for mask, channel in zip(masks.bool(), (0, 2)):
        image[:, mask] = 0
        image[channel, mask] = 255
    boxes = torch.tensor([mask_extent(m) for m in masks], dtype=torch.float32)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([1, 2]),
        "masks": tv_tensors.Mask(masks),
    }
    return tv_tensors.Image(image), target


def test_large_scale_jitter_keeps_image_boxes_masks_and_labels_aligned():
    size = 64
    transforms = build_transforms([800], 1333, flip_prob=0.5, lsj_size=size, lsj_scale=(0.3, 2.0))
    torch.manual_seed(0)
    counts = set()
    for _ in range(40):
        image, target = transforms(*coloured_sample())
        assert image.shape == (3, size, size) and target["masks"].shape[-2:] == (size, size)
        counts.add(len(target["labels"]))
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
        for box, mask, label in zip(target["boxes"], target["masks"], target["labels"]):
            assert mask.any()  # instances cut away entirely were dropped
            # The box is exactly the visible part's extent, not the clipped original box.
            assert box.tolist() == mask_extent(mask)
            # The mask covers pixels of its own instance's colour (red 1, blue 2).
            means = image[:, mask.bool()].float().mean(1)
            assert means.argmax() == (0 if label == 1 else 2), (label, means)
        # Every pixel is the image's (one full channel) or the padding colour, but for
        # antialiased edges.
        pad = torch.tensor(PAD_COLOUR, dtype=torch.uint8)[:, None, None]
        padded = (image == pad).all(0)
        from_image = image.max(0).values > 200
        assert (padded | from_image).float().mean() > 0.9
    assert {1, 2} <= counts  # crops sometimes cut an instance away


def test_boxes_from_masks_tightens_a_cut_instance():
    image, target = coloured_sample()
    target["boxes"] = tv_tensors.wrap(
        torch.tensor([[0.0, 0.0, 90.0, 60.0]] * 2), like=target["boxes"]
    )
    target["masks"][1] = 0  # an instance cut away entirely: its box becomes empty
    _, out = BoxesFromMasks()(image, target)
    assert out["boxes"][0].tolist() == [10.0, 5.0, 50.0, 45.0]
    assert out["boxes"][1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_large_scale_jitter_on_boxes_only_targets():
    transforms = build_transforms([800], 1333, flip_prob=0.0, lsj_size=64)
    torch.manual_seed(1)
    for _ in range(20):
        image, target = sample()
        del target["masks"]
        image, target = transforms(image, target)
        assert image.shape == (3, 64, 64) and "masks" not in target
        red = image[0] > 127
        for box in target["boxes"]:
            x1, y1, x2, y2 = box.round().long().tolist()
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            # The clipped box lies on the (rectangular) red object.
            assert red[y1:y2, x1:x2].float().mean() > 0.8


def test_color_jitter_changes_pixels_only():
    plain = build_transforms([60], 1000, flip_prob=0.0)
    jitter = build_transforms([60], 1000, flip_prob=0.0, color_jitter=0.4)

    def mid_grey_sample():
        image, target = sample()
        return tv_tensors.wrap(image // 2 + 60, like=image), target

    torch.manual_seed(0)
    image, target = plain(*mid_grey_sample())
    jittered, jittered_target = jitter(*mid_grey_sample())
    assert (image.float() - jittered.float()).abs().mean() > 1
    assert torch.equal(target["boxes"], jittered_target["boxes"])
    assert torch.equal(target["masks"], jittered_target["masks"])
