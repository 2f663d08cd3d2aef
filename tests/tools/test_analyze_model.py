"""analyze_model on the demo recipe, against published ResNet-18 numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import RecipeError, load_recipe
from trainer.models import build_detector
from trainer.tools import analyze_model

DEMO = str(Path(__file__).resolve().parents[2] / "recipes/demo.yaml")
# torchvision's ResNet-18: 11,689,512 parameters, 1.814 GMACs at 224 x 224; its 1000-way
# classifier (512 * 1000 + 1000 parameters) is not part of a detection backbone.
RESNET18_PARAMS = 11_689_512 - 513_000
RESNET18_FLOPS_224 = 2 * 1.814e9


def test_parameters_and_flops_of_the_demo_detector(capsys):
    # 256 is a multiple of the model's padding (64), so the backbone sees exactly 256 x 256.
    stats = analyze_model.main([DEMO, "--num-classes", "3", "--size", "256"])
    rows = {s.name: s for s in stats}
    model, backbone = rows[""], rows["backbone"]
    assert backbone.params == RESNET18_PARAMS
    assert backbone.flops == pytest.approx(RESNET18_FLOPS_224 * (256 / 224) ** 2, rel=0.01)
    # The demo trains from scratch: nothing is frozen.
    assert model.trainable == model.params
    assert model.params == sum(rows[n].params for n in ("backbone", "fpn", "rpn", "roi_heads"))
    top = ("backbone", "fpn", "rpn", "roi_heads")
    # The rest is the model's own code (mask pasting), shown in a row of its own.
    own = model.flops - sum(rows[n].flops for n in top)
    assert 0 <= own < 0.1 * model.flops
    # roi_heads runs through a method, not forward: it still gets its heads' FLOPs.
    assert (
        rows["roi_heads"].flops
        == rows["roi_heads.box_head"].flops + rows["roi_heads.mask_head"].flops
        > 0
    )

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "resnet18 Mask R-CNN, 3 classes, input 256x256"
    assert lines[1].split() == ["module", "params", "trainable", "GFLOPs", "FLOPs", "%"]
    names = [line.split()[0] for line in lines[2:-1]]
    assert names[0] == "model" and names[-1] == "(outside"
    # Depth 2: the four parts, each followed by its children.
    depth_one = [line.split()[0] for line in lines if line.startswith("  ") and line[2] != " "]
    assert depth_one == [*top, "(outside"]
    assert len(names) == 2 + len(top) + len([n for n in rows if n.count(".") == 1])
    assert lines[-2].split()[-2] == f"{own / 1e9:.3f}"
    assert lines[3].split()[1:4] == ["11.18M", "11.18M", f"{backbone.flops / 1e9:.3f}"]
    assert lines[-1].startswith(f"total: {model.params / 1e6:.2f}M parameters")


def test_frozen_stages_are_not_trainable():
    frozen_stage = ["--num-classes", "3", "--size", "64", "--depth", "1"]
    stats = analyze_model.main([DEMO, *frozen_stage, "model.backbone.frozen_stages=1"])
    # timm's ResNet: the stem (conv1, bn1) and the first stage (layer1) get no gradient.
    model = build_detector(load_recipe(DEMO, ["model.backbone.frozen_stages=1"]).model, 3)
    stem_and_stage = sum(
        p.numel()
        for name, p in model.backbone.named_parameters()
        if name.split(".")[1] in ("conv1", "bn1", "layer1")
    )
    assert stem_and_stage >= 64 * 3 * 7 * 7 + 4 * 64 * 64 * 3 * 3  # their convolutions
    assert stats[0].params - stats[0].trainable == stem_and_stage


def test_class_count_is_needed(tmp_path):
    missing = [f"data.{s}.ann_file={tmp_path}/{s}.json" for s in ("train", "val")]
    with pytest.raises(RecipeError, match="--num-classes"):
        analyze_model.main([DEMO, *missing])
