import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops import roi_align

from trainer.ops.masks import crop_and_resize, paste_masks


def test_crop_and_resize_matches_roi_align_reference():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 40, 50, generator=g) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[3.0, 4.0, 30.0, 35.0], [10.5, 0.0, 49.0, 20.2], [0.0, 0.0, 50.0, 40.0]])
    index = torch.tensor([2, 0, 1])
    ours = crop_and_resize(masks, index, boxes, 14)
    rois = torch.cat((index[:, None].float(), boxes), dim=1)
    reference = roi_align(masks[:, None].float(), rois, 14, 1.0, 2, aligned=True)[:, 0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_crop_and_resize_of_a_box_filled_mask_is_foreground_everywhere():
    masks = torch.zeros(1, 30, 30, dtype=torch.uint8)
    masks[0, 5:25, 10:20] = 1
    target = crop_and_resize(masks, torch.tensor([0]), torch.tensor([[10.0, 5.0, 20.0, 25.0]]), 28)
    # Edge cells blend in the outside (aligned sampling), but stay above the 0.5 threshold.
    assert (target >= 0.5).all() and target[:, 2:-2, 2:-2].min().item() == 1.0


def test_paste_full_mask_fills_its_box():
    masks = torch.ones(2, 28, 28)
    boxes = torch.tensor([[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 7.0, 9.0]])
    pasted = paste_masks(masks, boxes, 20, 40)
    assert pasted.dtype == torch.bool and pasted.shape == (2, 20, 40)
    expected = torch.zeros(2, 20, 40, dtype=torch.bool)
    expected[0, 5:15, 10:30] = True
    expected[1, 0:9, 0:7] = True
    assert torch.equal(pasted, expected)


def test_paste_matches_bilinear_resize():
    # A mask pasted into a box at integer coordinates equals the mask resized bilinearly
    # (half-pixel centres) to the box size, thresholded, placed at the box.
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 28, 28, generator=g)
    pasted = paste_masks(mask, torch.tensor([[8.0, 4.0, 64.0, 46.0]]), 60, 80)
    resized = torch.nn.functional.interpolate(
        mask[None], size=(42, 56), mode="bilinear", align_corners=False
    )[0, 0]
    inner = pasted[0, 5:45, 9:63]  # away from the border, where zero padding takes part
    assert (inner == (resized[1:41, 1:55] >= 0.5)).float().mean() > 0.999
    assert not pasted[0, :3].any() and not pasted[0, :, :7].any()


def disk_masks(count: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """[count, height, width] uint8 filled disks at random places."""
    yy, xx = torch.meshgrid(torch.arange(height * 1.0), torch.arange(width * 1.0), indexing="ij")
    cx = torch.rand(count, 1, 1, generator=g) * width * 0.6 + width * 0.2
    cy = torch.rand(count, 1, 1, generator=g) * height * 0.6 + height * 0.2
    radius = torch.rand(count, 1, 1, generator=g) * min(height, width) * 0.2 + 10
    return (((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() < radius).to(torch.uint8)


def random_boxes(count: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=g) * 50
    return torch.cat((xy, xy + torch.rand(count, 2, generator=g) * (high - low) + low), dim=1)


def test_mask_targets_are_torchvision_projection_shifted_by_half_a_pixel():
    """Deliberate difference: targets are sampled with aligned=True (Detectron2), so they
    equal torchvision's project_masks_on_boxes (aligned=False) on boxes moved by -0.5 px.
    Boxes of 29-56 px make torchvision's adaptive sampling use the same 2x2 samples."""
    g = torch.Generator().manual_seed(2)
    masks = disk_masks(3, 100, 120, g)
    index = torch.randint(0, 3, (60,), generator=g)
    boxes = random_boxes(60, 29, 56, g)
    ours = crop_and_resize(masks, index, boxes, 28)
    torch.testing.assert_close(
        ours, project_masks_on_boxes(masks, boxes - 0.5, index, 28), atol=1e-5, rtol=0
    )
    # Unshifted, the two differ at the mask edges only.
    theirs = project_masks_on_boxes(masks, boxes, index, 28)
    assert 0 < ((ours >= 0.5) != (theirs >= 0.5)).float().mean() < 0.03


def test_mask_targets_of_small_and_large_boxes_stay_close_to_torchvision():
    """For other sizes torchvision samples each cell ceil(box/28) times per axis; ours
    always 2x2, which changes values at the mask edges only."""
    g = torch.Generator().manual_seed(3)
    masks = disk_masks(3, 100, 120, g)
    index = torch.randint(0, 3, (60,), generator=g)
    for low, high in [(1, 28), (57, 100)]:
        boxes = random_boxes(60, low, high, g)
        ours = crop_and_resize(masks, index, boxes, 28)
        theirs = project_masks_on_boxes(masks, boxes - 0.5, index, 28)
        assert ((ours >= 0.5) != (theirs >= 0.5)).float().mean() < 0.02


def grid_sample_paste(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int):
    """Detectron2's paste (``_do_paste_mask``) over the whole image: pixel centres sampled
    bilinearly from the mask stretched over the box, zero outside."""
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    gx = ((xs[None] - x1) / (x2 - x1) * 2 - 1)[:, None, :].expand(-1, height, -1)
    gy = ((ys[None] - y1) / (y2 - y1) * 2 - 1)[:, :, None].expand(-1, -1, width)
    grid = torch.stack((gx, gy), dim=3)
    return torch.nn.functional.grid_sample(masks[:, None], grid, align_corners=False)[:, 0]


def test_paste_matches_grid_sample_reference():
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(70, 28, 28, generator=g)
    boxes = torch.cat(
        (
            random_boxes(30, 0.5, 90, g),  # some reach past the bottom and right
            random_boxes(30, 0.5, 90, g) - 40,  # some start before the top and left
            torch.tensor([[-5.0, -5.0, 140.0, 100.0], [3.2, 4.7, 3.9, 5.1]]).repeat(5, 1),
        )
    )
    probs = grid_sample_paste(masks, boxes, 97, 131)
    # a low threshold makes pixels around the box count, where the window must reach
    for threshold in (0.5, 0.2):
        ours = paste_masks(masks, boxes, 97, 131, threshold, chunk=16)
        decided = (probs - threshold).abs() > 1e-4  # leave out float ties at the threshold
        assert torch.equal(ours[decided], (probs >= threshold)[decided])


def test_paste_is_close_to_torchvision_paste_masks_in_image():
    """Deliberate difference: torchvision rounds each box to whole pixels and pastes it one
    pixel larger (x2 - x1 + 1); ours samples the exact box, so masks differ by about a
    pixel at their borders."""
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    centres = torch.rand(40, 2, 1, 1, generator=g) - 0.5
    radius = torch.rand(40, 1, 1, generator=g) * 0.5 + 0.3
    distance = ((xx - centres[:, 0]) ** 2 + (yy - centres[:, 1]) ** 2).sqrt()
    masks = torch.sigmoid(10 * (radius - distance))  # soft disks
    boxes = random_boxes(40, 20, 150, g)
    ours = paste_masks(masks, boxes, 240, 320)
    theirs = paste_masks_in_image(masks[:, None], boxes, (240, 320))[:, 0] >= 0.5
    iou = (ours & theirs).flatten(1).sum(1) / (ours | theirs).flatten(1).sum(1)
    assert iou.min() > 0.8 and iou.mean() > 0.93
