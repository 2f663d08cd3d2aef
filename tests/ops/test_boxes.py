import math

import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import box_iou

from trainer.ops.boxes import (
    BoxCoder,
    batched_box_iou,
    clip_boxes,
    rank_within_groups,
    scatter_per_image,
)


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 100
    wh = torch.rand(n, 2, generator=generator) * 50 + 1
    return torch.cat((xy, xy + wh), dim=1)


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes, reference = random_boxes(50, g), random_boxes(50, g)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = BoxCoder(weights)
        torch.testing.assert_close(coder.decode(coder.encode(boxes, reference), reference), boxes)


def test_encode_known_values():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    boxes = torch.tensor([[5.0, 0.0, 15.0, 40.0]])  # shifted half a width right, twice as tall
    expected = torch.tensor([[10 * 0.5, 10 * 0.5, 0.0, 5 * torch.log(torch.tensor(2.0))]])
    torch.testing.assert_close(coder.encode(boxes, reference), expected)


def test_encode_matches_torchvision():
    g = torch.Generator().manual_seed(2)
    boxes, reference = random_boxes(200, g), random_boxes(200, g)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        expected = TorchvisionBoxCoder(weights).encode_single(boxes, reference)
        torch.testing.assert_close(BoxCoder(weights).encode(boxes, reference), expected)


def test_decode_matches_torchvision_including_the_scale_clamp():
    g = torch.Generator().manual_seed(3)
    reference = random_boxes(100, g)
    num_classes = 3
    deltas = torch.randn(100, num_classes, 4, generator=g) * 3  # some scales past the clamp
    deltas[:5, :, 2:] = 20.0
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = TorchvisionBoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
        expected = coder.decode_single(deltas.reshape(100, -1), reference).reshape(100, -1, 4)
        ours = BoxCoder(weights).decode(deltas, reference[:, None, :])
        torch.testing.assert_close(ours, expected)


def test_coder_works_in_fp32_under_bf16_inputs():
    g = torch.Generator().manual_seed(4)
    boxes, reference = random_boxes(20, g), random_boxes(20, g)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = coder.encode(boxes.bfloat16(), reference.bfloat16())
    assert deltas.dtype == torch.float32
    assert coder.decode(deltas.bfloat16(), reference.bfloat16()).dtype == torch.float32


def test_decode_clamps_huge_scales():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    box = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert torch.isfinite(box).all()
    assert (box[:, 2] - box[:, 0]).item() < 100


def test_batched_iou_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    a = torch.stack([random_boxes(7, g) for _ in range(3)])
    b = torch.stack([random_boxes(11, g) for _ in range(3)])
    ours = batched_box_iou(a, b)
    for i in range(3):
        torch.testing.assert_close(ours[i], box_iou(a[i], b[i]))
    shared = random_boxes(5, g)
    torch.testing.assert_close(batched_box_iou(a, shared)[2], box_iou(a[2], shared))


def test_clip_boxes_per_image():
    boxes = torch.tensor([[[-5.0, -5.0, 200.0, 300.0]], [[-5.0, -5.0, 200.0, 300.0]]])
    clipped = clip_boxes(boxes, torch.tensor([[100, 50], [400, 400]]))
    assert clipped[0, 0].tolist() == [0, 0, 50, 100]
    assert clipped[1, 0].tolist() == [0, 0, 200, 300]


def test_rank_within_groups_and_scatter():
    groups = torch.tensor([1, 0, 1, 1, 0, 2])
    assert rank_within_groups(groups).tolist() == [0, 0, 1, 2, 1, 0]
    values = torch.arange(6.0)[:, None]
    out, valid = scatter_per_image(values, groups, rank_within_groups(groups), 3, 3)
    assert out[1, :, 0].tolist() == [0.0, 2.0, 3.0]
    assert valid.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
