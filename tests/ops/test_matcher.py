import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from trainer.ops.boxes import batched_box_iou
from trainer.ops.matcher import IGNORE, NEGATIVE, POSITIVE, match, sample


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 200
    return torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 80 + 2), dim=1)


def torchvision_labels(matches: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(matches, POSITIVE)
    labels[matches == Matcher.BELOW_LOW_THRESHOLD] = NEGATIVE
    labels[matches == Matcher.BETWEEN_THRESHOLDS] = IGNORE
    return labels


def test_match_equals_torchvision_matcher_on_a_padded_batch():
    """Same labels and matched boxes as torchvision's Matcher, image by image, for the RPN
    (0.7 / 0.3 with low-quality matches) and the box head (0.5 / 0.5 without)."""
    g = torch.Generator().manual_seed(0)
    counts = [5, 1, 12]
    gt = torch.zeros(3, 12, 4)
    gt_valid = torch.zeros(3, 12, dtype=torch.bool)
    for i, count in enumerate(counts):
        gt[i, :count] = random_boxes(count, g)
        gt_valid[i, :count] = True
    candidates = random_boxes(500, g)
    for fg, bg, low_quality in [(0.7, 0.3, True), (0.5, 0.5, False)]:
        matched, labels = match(batched_box_iou(gt, candidates), gt_valid, fg, bg, low_quality)
        reference = Matcher(fg, bg, allow_low_quality_matches=low_quality)
        for i, count in enumerate(counts):
            expected = reference(box_iou(gt[i, :count], candidates))
            assert torch.equal(labels[i].long(), torchvision_labels(expected))
            positive = expected >= 0
            assert torch.equal(matched[i][positive], expected[positive])


def test_ground_truth_overlapping_nothing_gets_no_low_quality_match():
    """Deliberate difference: torchvision makes every candidate with the box's best IoU
    positive even when that IoU is 0, i.e. all candidates; we require an overlap."""
    iou = torch.tensor([[[0.0, 0.0, 0.0], [0.2, 0.1, 0.0]]])
    _, labels = match(iou, torch.tensor([[True, True]]), 0.7, 0.3, allow_low_quality=True)
    assert labels.tolist() == [[POSITIVE, NEGATIVE, NEGATIVE]]
    expected = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou[0])
    assert (expected >= 0).all()


def test_match_thresholds_and_padding():
    # one image, two ground truth slots (second is padding), four candidates
    iou = torch.tensor([[[0.8, 0.5, 0.1, 0.65], [0.99, 0.99, 0.99, 0.99]]])
    valid = torch.tensor([[True, False]])
    matched, labels = match(iou, valid, 0.7, 0.3, allow_low_quality=False)
    assert labels.tolist() == [[POSITIVE, IGNORE, NEGATIVE, IGNORE]]
    assert matched[0, 0].item() == 0  # padding never wins


def test_low_quality_matches_give_every_box_an_anchor():
    iou = torch.tensor([[[0.4, 0.2, 0.4], [0.1, 0.5, 0.0]]])
    valid = torch.tensor([[True, True]])
    matched, labels = match(iou, valid, 0.7, 0.3, allow_low_quality=True)
    # both ties of box 0 and the best of box 1 become positive
    assert labels.tolist() == [[POSITIVE, POSITIVE, POSITIVE]]
    assert matched.tolist() == [[0, 1, 0]]


def test_no_ground_truth_means_all_negative():
    matched, labels = match(
        torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.bool), 0.7, 0.3, True
    )
    assert (labels == NEGATIVE).all() and matched.shape == (2, 5)


def test_sample_respects_counts_and_fraction():
    torch.manual_seed(0)
    labels = torch.full((3, 1000), NEGATIVE, dtype=torch.int8)
    labels[0, :10] = POSITIVE  # few positives: negatives fill up
    labels[1, :500] = POSITIVE  # many positives: capped at the fraction
    labels[2, :] = IGNORE  # nothing to sample
    labels[2, :3] = NEGATIVE
    index, valid = sample(labels, 256, 0.25)
    chosen = labels.gather(1, index)
    for row, (pos, neg) in enumerate([(10, 246), (64, 192), (0, 3)]):
        row_labels = chosen[row][valid[row]]
        assert (row_labels == POSITIVE).sum().item() == pos
        assert (row_labels == NEGATIVE).sum().item() == neg
        assert index[row][valid[row]].unique().numel() == pos + neg  # no repeats


def test_sample_is_random():
    labels = torch.full((1, 1000), NEGATIVE, dtype=torch.int8)
    first, _ = sample(labels, 10, 0.5)
    second, _ = sample(labels, 10, 0.5)
    assert set(first[0, 5:].tolist()) != set(second[0, 5:].tolist())
