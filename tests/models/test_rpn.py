import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.rpn import RegionProposalNetwork as TorchvisionRPN
from torchvision.models.detection.rpn import RPNHead

from trainer.models.rpn import RegionProposalNetwork

STRIDES = [4, 8, 16, 32, 64]
SIZES = [16, 32, 64, 128, 256]
RATIOS = [0.5, 1.0, 2.0]


def build_pair(pre_nms: int, post_nms: int):
    ours = RegionProposalNetwork(
        channels=8,
        strides=STRIDES,
        anchor_sizes=SIZES,
        aspect_ratios=RATIOS,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"train": pre_nms, "test": pre_nms},
        post_nms_top_n={"train": post_nms, "test": post_nms},
        nms_thresh=0.7,
    )
    theirs = TorchvisionRPN(
        TorchvisionAnchors(tuple((s,) for s in SIZES), (tuple(RATIOS),) * len(SIZES)),
        RPNHead(8, len(RATIOS)),
        0.7,
        0.3,
        256,
        0.5,
        dict(training=pre_nms, testing=pre_nms),
        dict(training=post_nms, testing=post_nms),
        0.7,
    )
    return ours, theirs


def test_proposal_selection_matches_torchvision_filter_proposals():
    """Per-level top-k, decode, clip, small-box removal, NMS per image and level and the
    post-NMS top-k per image, on the same scores and deltas, give the same proposals in
    the same order (torchvision loops over images; ours does the batch at once)."""
    g = torch.Generator().manual_seed(0)
    image_sizes = torch.tensor([[128, 160], [96, 160], [128, 100]])
    shapes = [(-(-128 // s), -(-160 // s)) for s in STRIDES]
    ours, theirs = build_pair(pre_nms=300, post_nms=150)
    anchors = ours.anchor_generator(shapes, STRIDES, torch.device("cpu"))
    logits = [torch.randn(3, len(a), generator=g) * 3 for a in anchors]
    deltas = [torch.randn(3, len(a), 4, generator=g) * 0.3 for a in anchors]

    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        proposals, valid = ours.select_proposals(logits, deltas, anchors, image_sizes)
        decoded = theirs.box_coder.decode(
            torch.cat(deltas, 1).reshape(-1, 4), [torch.cat(anchors)] * 3
        )
        expected, _ = theirs.filter_proposals(
            decoded.view(3, -1, 4),
            torch.cat(logits, 1),
            [tuple(s) for s in image_sizes.tolist()],
            [len(a) for a in anchors],
        )
        for i in range(3):
            assert valid[i].sum() == len(expected[i]) <= 150
            torch.testing.assert_close(proposals[i][valid[i]], expected[i])
            assert not valid[i][len(expected[i]) :].any()  # valid rows come first


def test_proposals_are_clipped_and_non_empty():
    g = torch.Generator().manual_seed(1)
    ours, _ = build_pair(pre_nms=100, post_nms=50)
    ours.eval()
    image_sizes = torch.tensor([[64, 96], [40, 30]])
    shapes = [(-(-64 // s), -(-96 // s)) for s in STRIDES]
    anchors = ours.anchor_generator(shapes, STRIDES, torch.device("cpu"))
    logits = [torch.randn(2, len(a), generator=g) for a in anchors]
    deltas = [torch.randn(2, len(a), 4, generator=g) * 2 for a in anchors]
    proposals, valid = ours.select_proposals(logits, deltas, anchors, image_sizes)
    for i, (h, w) in enumerate(image_sizes.tolist()):
        boxes = proposals[i][valid[i]]
        assert len(boxes) > 0
        assert (
            (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        )
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1e-3).all()
