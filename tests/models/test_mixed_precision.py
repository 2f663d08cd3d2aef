import pytest
import torch

from tests.models.conftest import box_target, small_model_config
from trainer.models import build_detector


def batch():
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 50)]
    targets = [
        box_target(64, 80, [[5, 5, 40, 30], [20, 10, 70, 60]], [1, 3]),
        box_target(70, 50, [[3, 3, 45, 60]], [2]),
    ]
    return images, targets


def test_bf16_autocast_trains_with_fp32_losses_and_box_decoding():
    torch.manual_seed(0)
    model = build_detector(small_model_config(), num_classes=3).train()
    images, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched, sizes = model.preprocess(images)
        pyramid = model.fpn(model.backbone(batched))
        assert pyramid[0].dtype == torch.bfloat16  # the convolutions do run in bf16
        proposals, _, _ = model.rpn(pyramid, sizes, None)
        losses = model(images, targets)
    assert proposals.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
    for output in outputs:
        assert output["boxes"].dtype == output["scores"].dtype == torch.float32
        assert output["masks"].dtype == torch.bool and torch.isfinite(output["boxes"]).all()


@pytest.mark.slow
def test_fp16_autocast_with_grad_scaler_steps_without_nan():
    torch.manual_seed(0)
    model = build_detector(small_model_config(), num_classes=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    images, targets = batch()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            losses = model(images, targets)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
