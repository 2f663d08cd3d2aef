import torch

from tests.models.conftest import box_target

LOSSES = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}


def test_images_without_objects_give_zero_box_and_mask_losses(small_model):
    small_model.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 50)]
    targets = [box_target(64, 80, [], []), box_target(70, 50, [], [])]
    losses = small_model(images, targets)
    assert set(losses) == LOSSES
    assert losses["loss_rpn_bbox"].item() == 0.0
    assert losses["loss_bbox"].item() == 0.0
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_rpn_cls"].item() > 0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    # every trainable parameter still gets a gradient (distributed training needs it)
    assert all(p.grad is not None for p in small_model.parameters() if p.requires_grad)


def test_mixed_batch_trains_and_every_loss_is_finite(small_model):
    small_model.train()
    images = [torch.rand(3, 64, 80), torch.randint(0, 255, (3, 96, 64), dtype=torch.uint8)]
    targets = [
        box_target(64, 80, [[5, 5, 40, 30], [20, 10, 70, 60]], [1, 3]),
        box_target(96, 64, [], []),
    ]
    losses = small_model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[k].item() > 0 for k in ("loss_rpn_bbox", "loss_bbox", "loss_mask"))


def test_eval_outputs_follow_the_contract(small_model):
    small_model.eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 50, 70)]
    with torch.no_grad():
        outputs = small_model(images, output_sizes=[(128, 160), (50, 70)])
    assert len(outputs) == 2
    for output, (h, w) in zip(outputs, [(128, 160), (50, 70)]):
        n = len(output["boxes"])
        assert 0 < n <= 100
        assert output["boxes"].shape == (n, 4) and output["boxes"].dtype == torch.float32
        assert output["labels"].dtype == torch.int64
        assert output["labels"].min() >= 1 and output["labels"].max() <= 3
        assert output["scores"].shape == (n,) and (output["scores"] > 0.05).all()
        assert output["masks"].shape == (n, h, w) and output["masks"].dtype == torch.bool
        assert (output["boxes"][:, 2] <= w + 1e-3).all() and (
            output["boxes"][:, 3] <= h + 1e-3
        ).all()
    # the first image was asked for at twice its size: its boxes reach past the input size
    assert outputs[0]["boxes"][:, 2].max() > 80


def test_overfits_a_single_image():
    """The whole detector learns: on one image, losses fall far and the object is found."""
    from tests.models.conftest import small_model_config
    from trainer.models import build_detector

    torch.manual_seed(0)
    model = build_detector(small_model_config(), num_classes=2)
    image = torch.full((3, 64, 64), 0.2)
    image[:, 16:48, 8:40] = 0.9
    target = box_target(64, 64, [[8, 16, 40, 48]], [2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    first = None
    for _ in range(150):
        losses = model([image, image], [target, target])
        loss = sum(losses.values())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.35 * first
    model.eval()
    with torch.no_grad():
        (output,) = model([image])
    best = output["scores"].argmax()
    assert output["labels"][best].item() == 2
    from torchvision.ops import box_iou

    assert box_iou(output["boxes"][best : best + 1], target["boxes"]).item() > 0.75
    mask = output["masks"][best]
    truth = target["masks"][0].bool()
    assert (mask & truth).sum() / (mask | truth).sum() > 0.7
