import pytest
import torch
from omegaconf import OmegaConf

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
    from tests.models.conftest import lean_model_config
    from trainer.models import build_detector

    torch.manual_seed(0)
    model = build_detector(lean_model_config(), num_classes=2)
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


def test_two_hundred_objects_in_one_image(small_model):
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 100, (200, 2), generator=g)
    wh = torch.randint(4, 28, (200, 2), generator=g)
    boxes = torch.cat((xy, (xy + wh).clamp(max=128)), dim=1).tolist()
    labels = torch.randint(1, 4, (200,), generator=g).tolist()
    small_model.train()
    losses = small_model(
        [torch.rand(3, 128, 128), torch.rand(3, 96, 96)],
        [box_target(128, 128, boxes, labels), box_target(96, 96, [[10, 10, 50, 50]], [1])],
    )
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() > 0


def test_tiny_and_image_sized_boxes(small_model):
    small_model.train()
    boxes = [
        [0, 0, 96, 64],  # the whole image
        [40, 30, 41, 31],  # one pixel
        [10, 10, 11, 20],  # made nearly zero width below: matches nothing, must not give NaN
    ]
    target = box_target(64, 96, boxes, [1, 2, 3])
    target["boxes"][2, 2] = 10.01
    losses = small_model([torch.rand(3, 64, 96)], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in small_model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"boxes": torch.tensor([[10.0, 10, 10, 20]])},
            r"invalid box \[10.0, 10.0, 10.0, 20.0\] for target at index 1",
        ),
        ({"boxes": torch.tensor([[10.0, 30, 20, 20]])}, "positive height and width.*index 1"),
        (  # the second box of the target is the one named
            {
                "boxes": torch.tensor([[5.0, 5, 15, 15], [10, 10, 10, 20]]),
                "labels": torch.tensor([2, 2]),
                "masks": torch.zeros(2, 48, 64, dtype=torch.uint8),
            },
            r"invalid box \[10.0, 10.0, 10.0, 20.0\] for target at index 1",
        ),
        (
            {"boxes": torch.tensor([[10.0, 10, float("nan"), 20]])},
            r"invalid box \[10.0, 10.0, nan, 20.0\] for target at index 1",
        ),
        (
            {"boxes": torch.tensor([10.0, 10, 20, 20])},
            r"target 1: boxes must be a tensor of shape \[N, 4\], got \[4\]",
        ),
        ({"boxes": torch.tensor([[10, 10, 20, 20]])}, "target 1: boxes must be a float tensor"),
        ({"labels": torch.tensor([1, 2])}, r"target 1: labels must have shape \[1\], got \[2\]"),
        ({"labels": torch.tensor([2.0])}, "target 1: labels must be an int64 tensor"),
        (
            {"masks": torch.zeros(1, 32, 32, dtype=torch.uint8)},
            r"target 1: masks must be \[N, H, W\] = \[1, 48, 64\], got \[1, 32, 32\]",
        ),
    ],
)
def test_training_inputs_are_checked_like_torchvision(small_model, change, message):
    small_model.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    targets = [
        box_target(64, 80, [[5, 5, 40, 30]], [1]),
        box_target(48, 64, [[10, 10, 20, 20]], [2]),
    ]
    targets[1].update(change)
    with pytest.raises(ValueError, match=message):
        small_model(images, targets)
    with pytest.raises(ValueError, match=r"image 0 must be a \[3, H, W\] tensor, got \[64, 80\]"):
        small_model([torch.rand(64, 80)], targets[:1])


def test_images_without_objects_train(small_model):
    """Negative samples (torchvision's test_models_detection_negative_samples): finite
    losses, no mask loss, no box loss."""
    small_model.train()
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 64, 80, dtype=torch.uint8),
    }
    losses = small_model([torch.rand(3, 64, 80)], [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0 and losses["loss_bbox"] == 0 and losses["loss_rpn_bbox"] == 0


def test_odd_and_non_square_sizes_in_one_batch(small_model):
    sizes = [(37, 53), (101, 33), (64, 64)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    small_model.train()
    targets = [box_target(h, w, [[2, 3, w - 5, h - 4]], [1]) for h, w in sizes]
    losses = small_model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    small_model.eval()
    with torch.no_grad():
        outputs = small_model(images)
    for output, (h, w) in zip(outputs, sizes):
        assert output["masks"].shape[1:] == (h, w)
        boxes = output["boxes"]
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()


def test_boxes_only_targets_train_boxes_and_leave_the_mask_head_at_zero(small_model):
    """Without masks every other loss is what it is with them; the mask loss is zero and
    the mask head gets zero gradients (so distributed training still sees every parameter)."""
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        box_target(64, 80, [[5, 5, 40, 30], [20, 10, 70, 60]], [1, 3]),
        box_target(72, 64, [[8, 8, 50, 60]], [2]),
    ]
    boxes_only = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    small_model.train()
    torch.manual_seed(1)
    with_masks = small_model(images, targets)
    torch.manual_seed(1)
    losses = small_model(images, boxes_only)
    assert set(losses) == LOSSES and losses["loss_mask"].item() == 0.0
    for name in LOSSES - {"loss_mask"}:
        torch.testing.assert_close(losses[name], with_masks[name])
    sum(losses.values()).backward()
    for name, param in small_model.named_parameters():
        assert param.grad is not None, name
        if name.startswith("roi_heads.mask_head."):
            assert not param.grad.any(), name


def test_a_batch_mixing_boxes_only_and_mask_targets_is_refused(small_model):
    small_model.train()
    target = box_target(64, 64, [[5, 5, 40, 30]], [1])
    boxes_only = {k: v for k, v in target.items() if k != "masks"}
    with pytest.raises(ValueError, match="mixes targets"):
        small_model([torch.rand(3, 64, 64)] * 2, [target, boxes_only])


def test_every_part_runs_through_its_forward(small_model):
    """Module hooks see each part in training and inference: FSDP gathers a unit's
    parameters in its forward pre-hook, so a part called through another method would
    compute with sharded weights."""
    parts = ["backbone", "fpn", "rpn", "roi_heads", "roi_heads.box_head", "roi_heads.mask_head"]
    modules = dict(small_model.named_modules())
    for training in (True, False):
        called = set()
        hooks = [
            modules[name].register_forward_pre_hook(
                lambda m, a, name=name, seen=called: seen.add(name)
            )
            for name in parts
        ]
        small_model.train(training)
        image = torch.rand(3, 64, 64)
        with torch.set_grad_enabled(training):
            if training:
                small_model([image], [box_target(64, 64, [[6, 10, 40, 50]], [1])])
            else:
                small_model([image])
        for hook in hooks:
            hook.remove()
        assert called == set(parts), (
            f"training={training}: not through forward: {set(parts) - called}"
        )


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"backbone": {"name": "resnet5"}}, "model.backbone: 'resnet5' is not a timm model"),
        ({"rpn": {"anchor_sizes": [32, 64]}}, "model.rpn: anchor_sizes has 2 sizes"),
        ({"num_classes": None}, "model: num_classes is not set"),
    ],
)
def test_a_bad_value_met_while_building_names_its_recipe_node(edit, message):
    from tests.models.conftest import small_model_config
    from trainer.config import Recipe, RecipeError
    from trainer.models import build_detector

    cfg = OmegaConf.structured(Recipe).model  # its place in a recipe: "model"
    cfg.merge_with(small_model_config())
    cfg.num_classes = 2
    cfg.merge_with(edit)
    with pytest.raises(RecipeError, match="^" + message):
        build_detector(cfg)
