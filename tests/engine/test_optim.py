import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import LRScheduleConfig, OptimizerConfig
from trainer.engine.optim import build_lr_scheduler, build_optimizer, lr_factor


def test_lr_scales_linearly_with_global_batch():
    model = torch.nn.Linear(2, 2)
    cfg = OmegaConf.structured(OptimizerConfig(lr=0.02, base_batch_size=16))
    assert build_optimizer(model, cfg, 16).param_groups[0]["lr"] == pytest.approx(0.02)
    assert build_optimizer(model, cfg, 4).param_groups[0]["lr"] == pytest.approx(0.005)


def test_warmup_then_steps():
    kwargs = dict(
        iters_per_epoch=100, warmup_iters=500, warmup_ratio=0.001, steps=[8, 11], gamma=0.1
    )
    assert lr_factor(0, **kwargs) == pytest.approx(0.001)
    assert lr_factor(250, **kwargs) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(500, **kwargs) == 1.0
    assert lr_factor(799, **kwargs) == 1.0
    assert lr_factor(800, **kwargs) == pytest.approx(0.1)
    assert lr_factor(1100, **kwargs) == pytest.approx(0.01)


def test_scheduler_resumes_at_an_iteration():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = OmegaConf.structured(LRScheduleConfig(warmup_iters=10, steps=[1]))
    scheduler = build_lr_scheduler(optimizer, cfg, iters_per_epoch=20, start_iter=0)
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    optimizer2 = torch.optim.SGD(model.parameters(), lr=1.0)
    resumed = build_lr_scheduler(optimizer2, cfg, iters_per_epoch=20, start_iter=15)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lrs[15])
    assert lrs[19] == 1.0 and lrs[20] == pytest.approx(0.1)
    del resumed
