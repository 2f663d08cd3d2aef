from collections import OrderedDict

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from trainer.ops.poolers import MultiLevelRoIAlign, assign_levels


def random_rois(n: int, num_images: int, extent: float, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * extent * 0.6
    wh = torch.rand(n, 2, generator=g) * extent * 0.4 + 1
    image = torch.randint(0, num_images, (n, 1), generator=g).float()
    return torch.cat((image, xy, xy + wh), dim=1)


def test_level_assignment_matches_torchvision_level_mapper():
    g = torch.Generator().manual_seed(0)
    wh = torch.exp(torch.rand(2000, 2, generator=g) * 7)  # 1 .. 1100 px
    boxes = torch.cat((torch.zeros(2000, 2), wh), dim=1)
    # Sizes exactly at the level boundaries (224 * 2^k), where rounding decides the level.
    edges = torch.tensor([56.0, 112.0, 224.0, 448.0, 896.0])
    boxes = torch.cat((boxes, torch.stack((0 * edges, 0 * edges, edges, edges), dim=1)))
    expected = LevelMapper(2, 5)([boxes])
    torch.testing.assert_close(assign_levels(boxes, 2, 5), expected, rtol=0, atol=0)
    assert assign_levels(boxes[-5:], 2, 5).tolist() == [0, 1, 2, 3, 3]


def test_pooler_reproduces_torchvision_when_unaligned():
    """With torchvision's settings (aligned=False, 2x2 samples) the pooling is the same."""
    g = torch.Generator().manual_seed(1)
    strides = [4, 8, 16, 32]
    features = [torch.randn(2, 8, 256 // s, 320 // s, generator=g) for s in strides]
    rois = random_rois(300, 2, 256, g)
    reference = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=2)
    named = OrderedDict((str(i), f) for i, f in enumerate(features))
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = reference(named, boxes, [(256, 320)] * 2)
    ours = MultiLevelRoIAlign(7, strides, sampling_ratio=2, aligned=False)(
        features, torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    )
    torch.testing.assert_close(ours, expected)


def test_pooler_default_is_aligned_roi_align_on_the_assigned_level():
    """Deliberate difference: aligned=True (half-pixel offset) and an adaptive sampling
    ratio, as Detectron2; torchvision's pooler is unaligned."""
    g = torch.Generator().manual_seed(2)
    strides = [4, 8, 16, 32]
    features = [torch.randn(2, 4, 128 // s, 128 // s, generator=g) for s in strides]
    rois = random_rois(100, 2, 128, g)
    ours = MultiLevelRoIAlign(7, strides)(features, rois)
    levels = LevelMapper(2, 5)([rois[:, 1:]])
    for level, stride in enumerate(strides):
        chosen = levels == level
        expected = roi_align(features[level], rois[chosen], 7, 1 / stride, 0, aligned=True)
        torch.testing.assert_close(ours[chosen], expected)
    unaligned = MultiLevelRoIAlign(7, strides, aligned=False)(features, rois)
    assert (ours - unaligned).abs().max() > 0.1


def test_single_level_pools_every_box_from_it():
    features = [torch.randn(1, 3, 16, 16)]
    rois = torch.tensor([[0, 0, 0, 8.0, 8.0], [0, 2, 2, 60, 60]])
    ours = MultiLevelRoIAlign(5, [4])(features, rois)
    torch.testing.assert_close(ours, roi_align(features[0], rois, 5, 0.25, 0, aligned=True))


def test_head_applied_at_once_or_level_by_level_equals_head_on_all_pooled_rois():
    g = torch.Generator().manual_seed(3)
    strides = [4, 8, 16, 32]
    features = [torch.randn(2, 4, 256 // s, 256 // s, generator=g) for s in strides]
    rois = random_rois(80, 2, 256, g)
    weight = torch.randn(4 * 7 * 7, 3, generator=g)
    pooler = MultiLevelRoIAlign(7, strides)
    pooled = pooler(features, rois)
    levels = LevelMapper(2, 5)([rois[:, 1:]])
    for per_level, max_rois in [(False, None), (True, None), (True, 5)]:
        calls = []

        def head(level_pooled, index, calls=calls):
            calls.append(index)
            return level_pooled.flatten(1) @ weight, index.float()

        logits, rows = pooler(features, rois, head, per_level=per_level, max_rois=max_rois)
        torch.testing.assert_close(logits, pooled.flatten(1) @ weight)
        assert rows.tolist() == list(range(80))  # rows come back in the order of the rois
        if not per_level:
            assert len(calls) == 1
        else:
            # one call per level, or per chunk of at most max_rois of a level
            assert all(len(set(levels[index].tolist())) == 1 for index in calls)
            assert max(len(index) for index in calls) <= (max_rois or 80)
            expected = sum(-(-int(n) // (max_rois or 80)) for n in torch.bincount(levels) if n)
            assert len(calls) == expected


def test_no_rois_still_run_the_head_once():
    features = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)]
    for per_level in (False, True):
        calls = []
        out = MultiLevelRoIAlign(7, [4, 8])(
            features,
            torch.zeros(0, 5),
            lambda pooled, index, calls=calls: calls.append(1) or pooled.sum((2, 3)),
            per_level=per_level,
        )
        assert out.shape == (0, 4) and calls == [1]
