import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from trainer.config import load_recipe
from trainer.data import build_dataloader, build_dataset
from trainer.data.shapes import generate_shapes
from trainer.engine.val_phase import loss_mode, validate
from trainer.evaluation.coco import CocoEvaluator
from trainer.models import build_detector

ROOT = Path(__file__).resolve().parents[2]


def test_loss_mode_trains_the_model_but_not_its_norms_and_dropout():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.eval()
    with loss_mode(model):
        assert model.training and model[0].training
        assert not model[1].training and not model[2].training
    assert not any(module.training for module in model.modules())


@pytest.fixture(scope="module")
def val_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=2, num_val=4, image_size=64)
    cfg = load_recipe(
        ROOT / "recipes/demo.yaml",
        [
            f"data.val.ann_file={root}/annotations/val.json",
            f"data.val.img_dir={root}/val",
            "data.val.type=CocoDataset",
            "data.val.min_size=[64]",
            "model.backbone.name=test_resnet",
            "model.roi_heads.detections_per_img=10",
        ],
    )
    dataset = build_dataset(cfg.data.val, train=False)
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=len(dataset.CLASSES))
    return model, dataset


def test_val_computes_losses_and_metrics_and_changes_nothing(val_setup):
    model, dataset = val_setup
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(build_dataloader(dataset, 3, 0, shuffle=False))
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat, accelerator=accelerator)
    model.train()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    random_state = torch.get_rng_state()

    result = validate(model, loader, evaluator, accelerator, seed=0, keep_images=2)

    # BatchNorm running statistics, weights and the training random stream are untouched
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert torch.equal(torch.get_rng_state(), random_state)
    assert model.training and all(m.training for m in model.modules())
    assert result.num_images == 4
    assert {"loss_rpn_cls", "loss_cls", "loss_mask", "loss"} <= set(result.losses)
    assert all(math.isfinite(value) for value in result.losses.values())
    assert result.losses["loss"] == pytest.approx(
        sum(v for k, v in result.losses.items() if k != "loss")
    )
    assert {"bbox/AP", "segm/AP"} <= set(result.metrics)
    assert len(result.images) == 2
    image, prediction = result.images[0]
    height, width = dataset[0][1]["orig_size"]  # the loader's first image, at its file's size
    assert image.dtype == torch.uint8 and image.shape == (3, height, width)
    assert prediction["masks"].shape[-2:] == (height, width)

    # proposals are sampled from a fixed seed: every val phase measures the same thing
    again = validate(model, loader, evaluator, accelerator, seed=0)
    assert again.losses == result.losses
    assert again.metrics == result.metrics
