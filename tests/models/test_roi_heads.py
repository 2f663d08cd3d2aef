import torch
from torchvision.models.detection.roi_heads import RoIHeads as TorchvisionRoIHeads
from torchvision.models.detection.roi_heads import fastrcnn_loss

from trainer.models.losses import box_regression_loss, classification_loss
from trainer.models.roi_heads import RoIHeads

NUM_CLASSES = 4


def build_ours(**overrides) -> RoIHeads:
    args = dict(
        channels=8,
        strides=[4, 8, 16, 32],
        num_classes=NUM_CLASSES,
        batch_size_per_image=64,
        positive_fraction=0.25,
        fg_iou_thresh=0.5,
        box_coder_weights=[10.0, 10.0, 5.0, 5.0],
        box_pool_size=7,
        mask_pool_size=14,
        box_fc_dim=32,
        mask_conv_dim=8,
        num_mask_convs=1,
        num_box_convs=0,
        norm="none",
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=20,
    )
    return RoIHeads(**(args | overrides))


def test_detections_match_torchvision_postprocess_detections():
    """Score threshold, small-box removal, per-class NMS and the top detections per image,
    on the same logits, deltas and proposals, give the same detections in the same order."""
    g = torch.Generator().manual_seed(0)
    counts = [300, 50, 120]
    image_sizes = torch.tensor([[200, 300], [120, 90], [300, 300]])
    proposals = []
    for count, (h, w) in zip(counts, image_sizes.tolist()):
        xy = torch.rand(count, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(count, 2, generator=g) * 80 + 1
        proposals.append(torch.cat((xy, xy + wh), dim=1))
    total = sum(counts)
    class_logits = torch.randn(total, NUM_CLASSES + 1, generator=g) * 2
    deltas = torch.randn(total, NUM_CLASSES + 1, 4, generator=g)
    image = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))

    ours = build_ours().detect(class_logits, deltas, torch.cat(proposals), image, image_sizes)
    reference = TorchvisionRoIHeads(
        None, None, None, 0.5, 0.5, 64, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 20
    )
    boxes, scores, labels = reference.postprocess_detections(
        class_logits, deltas.reshape(total, -1), proposals, [tuple(s) for s in image_sizes.tolist()]
    )
    for i in range(3):
        mine = ours["image"] == i
        assert mine.sum() == len(boxes[i]) == 20
        torch.testing.assert_close(ours["boxes"][mine], boxes[i])
        torch.testing.assert_close(ours["scores"][mine], scores[i])
        assert torch.equal(ours["labels"][mine], labels[i])


def test_no_proposals_give_no_detections():
    heads = build_ours()
    out = heads.detect(
        torch.zeros(0, NUM_CLASSES + 1),
        torch.zeros(0, NUM_CLASSES + 1, 4),
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64),
        torch.tensor([[50, 50]]),
    )
    assert all(len(v) == 0 for v in out.values())


def test_box_head_losses_against_torchvision_fastrcnn_loss():
    """Classification is the same cross-entropy. Deliberate difference: the box loss is L1
    (Detectron2's default) where torchvision uses smooth L1 with beta 1/9; both are summed
    over positives and divided by the number of sampled RoIs. When every error is above
    1/9 the two differ by exactly 1/18 per positive coordinate."""
    g = torch.Generator().manual_seed(1)
    num = 64
    labels = torch.randint(0, NUM_CLASSES + 1, (num,), generator=g)
    class_logits = torch.randn(num, NUM_CLASSES + 1, generator=g)
    deltas = torch.randn(num, NUM_CLASSES + 1, 4, generator=g)
    targets = torch.randn(num, 4, generator=g)
    targets = targets + torch.sign(targets) * 0.2  # errors away from the smooth-L1 knee
    deltas[torch.arange(num), labels] = targets + torch.sign(torch.randn(num, 4, generator=g)) * (
        0.2 + torch.rand(num, 4, generator=g)
    )
    expected_cls, expected_box = fastrcnn_loss(
        class_logits, deltas.reshape(num, -1), [labels], [targets]
    )
    torch.testing.assert_close(classification_loss(class_logits, labels), expected_cls)
    fg = (labels > 0).nonzero().squeeze(1)
    ours_box = box_regression_loss(deltas[fg, labels[fg]], targets[fg], num)
    torch.testing.assert_close(ours_box, expected_box + fg.numel() * 4 / 18 / num)
