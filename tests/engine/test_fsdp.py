"""FSDP wiring on the CPU: launch/fsdp.yaml's plugin and wrap policy over the detector, one
sharded training step against DDP's arithmetic, and full state dicts a single process reads."""

import subprocess
import sys

import torch

from tests.engine.runs import ENV, ROOT
from tests.models.conftest import box_target, lean_model_config
from trainer.engine.checkpoint import load_weights
from trainer.models import build_detector


def test_fsdp_step_matches_ddp_and_its_weights_load_in_one_process(tmp_path):
    weights = tmp_path / "model.safetensors"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, str(ROOT / "tests/engine/fsdp_worker.py"), str(weights)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    # What trainer.evaluate does with exported weights: a plain model loads them strictly.
    model = build_detector(lean_model_config(name="test_resnet"), num_classes=3)
    load_weights(model, weights)
    model.eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 64, 64)])
    assert set(output) == {"boxes", "labels", "scores", "masks"}


def test_sharding_units_name_classes_of_the_model():
    """Accelerate resolves each of MaskRCNN._no_split_modules to a class in the model and
    fails the launch if one is missing; each unit must be entered through its forward."""
    for name in ("test_resnet", "test_convnext", "vit_tiny_patch16_224"):
        model = build_detector(lean_model_config(name=name), num_classes=2)
        classes = {type(m).__name__ for m in model.modules()}
        assert set(model._no_split_modules) <= classes
        called = set()
        hooks = [
            m.register_forward_pre_hook(lambda m, args, seen=called: seen.add(type(m).__name__))
            for m in model.modules()
            if type(m).__name__ in model._no_split_modules
        ]
        model.train()
        model([torch.rand(3, 64, 64)], [box_target(64, 64, [[6, 10, 40, 50]], [1])])
        model.eval()
        with torch.no_grad():
            model([torch.rand(3, 64, 64)])
        for hook in hooks:
            hook.remove()
        assert called == set(model._no_split_modules), name
