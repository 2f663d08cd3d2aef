import torch
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
