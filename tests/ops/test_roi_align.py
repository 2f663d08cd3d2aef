"""The CPU RoIAlign (one sparse product per chunk of RoIs) against torchvision's kernel."""

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from trainer.ops.roi_align import CHUNK, roi_align


def random_rois(num, batch, height, width, scale, max_size, generator):
    """Boxes anywhere from partly outside the image to well inside, of any size down to 0."""
    image_w, image_h = width / scale, height / scale
    corner = torch.rand(num, 2, generator=generator) * torch.tensor([image_w, image_h]) * 1.3
    corner -= 0.15 * torch.tensor([image_w, image_h])
    size = torch.rand(num, 2, generator=generator) * max_size
    size[: num // 10] = 0.0  # empty boxes
    index = torch.randint(0, batch, (num, 1), generator=generator).float()
    return torch.cat((index, corner, corner + size), dim=1)


@pytest.mark.parametrize(
    ("size", "scale", "sampling_ratio", "aligned", "max_size"),
    [
        (7, 1 / 8, 0, True, 120.0),  # box head: adaptive grid, aligned (our default)
        (14, 1 / 4, 0, True, 60.0),  # mask head
        (7, 1 / 32, 0, True, 1200.0),  # huge boxes on a coarse level: many samples per bin
        (7, 1 / 8, 2, False, 120.0),  # torchvision's MultiScaleRoIAlign setting
        (7, 1 / 8, 0, False, 120.0),
    ],
)
def test_forward_and_backward_equal_torchvision(size, scale, sampling_ratio, aligned, max_size):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 13, 17, generator=g, requires_grad=True)
    rois = random_rois(CHUNK + 40, 2, 13, 17, scale, max_size, g)  # more than one chunk
    expected = torchvision_roi_align(features, rois, size, scale, sampling_ratio, aligned)
    pooled = roi_align(features, rois, size, scale, sampling_ratio, aligned)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert pooled.is_contiguous()

    upstream = torch.randn(expected.shape, generator=g)
    (expected_grad,) = torch.autograd.grad(expected, features, upstream)
    (grad,) = torch.autograd.grad(pooled, features, upstream)
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-5)
    assert grad.is_contiguous()


def test_no_rois_and_dtypes():
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    pooled = roi_align(features, torch.zeros(0, 5), 7, 0.25)
    assert pooled.shape == (0, 4, 7, 7)
    pooled.sum().backward()
    assert not features.grad.any()
    rois = torch.tensor([[1.0, 4.0, 4.0, 20.0, 28.0]])
    half = roi_align(features.detach().bfloat16(), rois.bfloat16(), 7, 0.25)
    assert half.dtype == torch.bfloat16
    full = torchvision_roi_align(features.detach(), rois, 7, 0.25, 0, True)
    torch.testing.assert_close(half.float(), full, atol=0.05, rtol=0.02)
