import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.image_list import ImageList

from trainer.models.anchors import AnchorGenerator


def test_anchor_grid_matches_torchvision():
    sizes, ratios, strides = [32, 64, 128], [0.5, 1.0, 2.0], [4, 8, 16]
    shapes = [(12, 16), (6, 8), (3, 4)]
    ours = AnchorGenerator(sizes, ratios)(shapes, strides, torch.device("cpu"))

    reference = TorchvisionAnchors(tuple((s,) for s in sizes), (tuple(ratios),) * len(sizes))
    images = ImageList(torch.zeros(1, 3, 48, 64), [(48, 64)])
    features = [torch.zeros(1, 1, h, w) for h, w in shapes]
    expected = reference(images, features)[0]

    assert len(ours) == 3
    assert [len(a) for a in ours] == [h * w * 3 for h, w in shapes]
    torch.testing.assert_close(torch.cat(ours), expected)


def test_anchor_shapes_follow_ratio_and_size():
    (anchors,) = AnchorGenerator([64], [0.5, 1.0, 2.0])([(1, 1)], [16], torch.device("cpu"))
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    # ratio is height / width; the area stays about size^2 (up to rounding).
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0]), atol=0, rtol=0.03)
    torch.testing.assert_close(widths * heights, torch.full((3,), 64.0**2), rtol=0.03, atol=0)
    # centred on the cell origin
    torch.testing.assert_close(anchors[:, :2] + anchors[:, 2:], torch.zeros(3, 2))
