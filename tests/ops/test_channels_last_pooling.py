"""RoIAlign and the pooler on channels-last maps: the same values, no copies, the layout kept."""

import torch

from trainer.ops.poolers import MultiLevelRoIAlign
from trainer.ops.roi_align import CHUNK, roi_align


def test_channels_last_features_pool_and_backpropagate_as_nchw_ones():
    g = torch.Generator().manual_seed(0)
    nchw = torch.randn(2, 8, 13, 17, generator=g, requires_grad=True)
    nhwc = nchw.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    corner = torch.rand(CHUNK + 40, 2, generator=g) * 100
    rois = torch.cat(
        (
            torch.randint(0, 2, (CHUNK + 40, 1), generator=g).float(),
            corner,
            corner + torch.rand(CHUNK + 40, 2, generator=g) * 60,
        ),
        dim=1,
    )
    expected = roi_align(nchw, rois, 7, 1 / 8)
    pooled = roi_align(nhwc, rois, 7, 1 / 8)
    assert expected.is_contiguous()
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pooled, expected, atol=0, rtol=0)

    upstream = torch.randn(expected.shape, generator=g)
    (expected_grad,) = torch.autograd.grad(expected, nchw, upstream)
    (grad,) = torch.autograd.grad(pooled, nhwc, upstream)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad, expected_grad, atol=0, rtol=0)


def test_pooler_gives_the_same_outputs_for_either_layout():
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(1, 4, 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)]
    rois = torch.tensor(
        [[0, 1.0, 1.0, 20.0, 30.0], [0, 0.0, 0.0, 63.0, 63.0], [0, 10.0, 5.0, 12.0, 9.0]]
    )
    pooler = MultiLevelRoIAlign(7, [4, 8, 16, 32])
    expected = pooler(features, rois, per_level=True, max_rois=1)
    nhwc = [f.contiguous(memory_format=torch.channels_last) for f in features]
    torch.testing.assert_close(pooler(nhwc, rois, per_level=True, max_rois=1), expected)
