"""detectron2 model-zoo checkpoints (random weights in its parameter names and layout)."""

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from trainer.config import load_recipe
from trainer.models import build_detector
from trainer.models.backbone import TimmBackbone
from trainer.weights.coco_classes import COCO_CLASSES
from trainer.weights.detectron2 import read_detectron2_pkl
from trainer.weights.read import read_weights

RECIPE = "recipes/mask_rcnn_detectron2.yaml"


def detectron2_state_dict() -> dict[str, np.ndarray]:
    """mask_rcnn_R_50_FPN's parameters as detectron2 names them, random values (float32
    numpy arrays, as in its model-zoo pickles). Shapes from torchvision's ResNet-50, whose
    layer<i>.<b>.conv<j>/bn<j>/downsample are detectron2's res<i+1>.<b>.conv<j>(.norm)/shortcut."""
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.05

    state = {}
    resnet = resnet50().state_dict()
    for key, value in resnet.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] in ("conv1", "bn1"):
            name = "stem.conv1." + ("norm." if parts[0] == "bn1" else "") + parts[-1]
        else:
            stage, block, layer = int(parts[0][-1]) + 1, parts[1], parts[2]
            if layer == "downsample":
                inner = "shortcut." + ("norm." if parts[3] == "1" else "")
            elif layer.startswith("bn"):
                inner = f"conv{layer[-1]}.norm."
            else:
                inner = f"{layer}."
            name = f"res{stage}.{block}.{inner}{parts[-1]}"
        array = rand(*value.shape)
        if name.endswith("running_var"):
            array = np.abs(array) + 0.5
        state[f"backbone.bottom_up.{name}"] = array
    for level, width in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        state[f"backbone.fpn_lateral{level}.weight"] = rand(256, width, 1, 1)
        state[f"backbone.fpn_output{level}.weight"] = rand(256, 256, 3, 3)
        for kind in ("lateral", "output"):
            state[f"backbone.fpn_{kind}{level}.bias"] = rand(256)
    shapes = {
        "proposal_generator.rpn_head.conv": (256, 256, 3, 3),
        "proposal_generator.rpn_head.objectness_logits": (3, 256, 1, 1),
        "proposal_generator.rpn_head.anchor_deltas": (12, 256, 1, 1),
        "roi_heads.box_head.fc1": (1024, 256 * 7 * 7),
        "roi_heads.box_head.fc2": (1024, 1024),
        "roi_heads.box_predictor.cls_score": (81, 1024),
        "roi_heads.box_predictor.bbox_pred": (320, 1024),
        **{f"roi_heads.mask_head.mask_fcn{i}": (256, 256, 3, 3) for i in range(1, 5)},
        "roi_heads.mask_head.deconv": (256, 256, 2, 2),
        "roi_heads.mask_head.predictor": (80, 256, 1, 1),
    }
    for name, shape in shapes.items():
        state[f"{name}.weight"] = rand(*shape)
        state[f"{name}.bias"] = rand(shape[0])
    return state


@pytest.fixture(scope="module")
def model_zoo_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp("d2") / "model_final_f10217.pkl"
    state = detectron2_state_dict()
    with open(path, "wb") as file:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, file)
    return path, state


def test_model_zoo_pickle_loads_into_the_recipe_model(model_zoo_pkl):
    path, state = model_zoo_pkl
    weights = read_weights(path)
    assert weights.format == "detectron2" and weights.classes == COCO_CLASSES
    model = build_detector(load_recipe(RECIPE).model)
    missing, unexpected = model.load_state_dict(weights.state_dict, strict=False)
    assert missing == [] and unexpected == []
    ours = model.state_dict()
    cls = torch.from_numpy(state["roi_heads.box_predictor.cls_score.weight"])
    assert torch.equal(ours["roi_heads.box_head.cls_score.weight"][0], cls[80])  # background
    assert torch.equal(ours["roi_heads.box_head.cls_score.weight"][1:], cls[:80])
    reg = torch.from_numpy(state["roi_heads.box_predictor.bbox_pred.weight"])
    assert torch.equal(ours["roi_heads.box_head.bbox_pred.weight"][4:], reg)
    stem = torch.from_numpy(state["backbone.bottom_up.stem.conv1.weight"])
    assert torch.equal(ours["backbone.body.conv1.weight"], stem[:, [2, 1, 0]])  # BGR -> RGB
    assert torch.equal(
        ours["backbone.body.layer2.0.downsample.1.running_var"],
        torch.from_numpy(state["backbone.bottom_up.res3.0.shortcut.norm.running_var"]),
    )
    assert torch.equal(
        ours["roi_heads.mask_head.convs.6.weight"],
        torch.from_numpy(state["roi_heads.mask_head.mask_fcn4.weight"]),
    )
    assert torch.equal(
        ours["fpn.fpn.layer_blocks.3.0.weight"],
        torch.from_numpy(state["backbone.fpn_output5.weight"]),
    )


def test_stride_in_1x1_matches_an_msra_bottleneck(model_zoo_pkl):
    """Our backbone's stage-2 map equals one computed by hand, MSRA style: the stride in
    conv1 (1x1) of each stage's first block, on the BGR image normalized as detectron2 does."""
    path, state = model_zoo_pkl
    model = build_detector(load_recipe(RECIPE).model).eval()
    model.load_state_dict(read_weights(path).state_dict, strict=False)

    def param(name):
        return torch.from_numpy(state[f"backbone.bottom_up.{name}"])

    def frozen_bn(x, name):
        scale = param(f"{name}.weight") / torch.sqrt(param(f"{name}.running_var") + 1e-5)
        shift = param(f"{name}.bias") - param(f"{name}.running_mean") * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def bottleneck(x, prefix, stride):
        out = F.relu(
            frozen_bn(
                F.conv2d(x, param(f"{prefix}.conv1.weight"), stride=stride), f"{prefix}.conv1.norm"
            )
        )
        out = F.relu(
            frozen_bn(
                F.conv2d(out, param(f"{prefix}.conv2.weight"), padding=1), f"{prefix}.conv2.norm"
            )
        )
        out = frozen_bn(F.conv2d(out, param(f"{prefix}.conv3.weight")), f"{prefix}.conv3.norm")
        if f"backbone.bottom_up.{prefix}.shortcut.weight" in state:
            x = frozen_bn(
                F.conv2d(x, param(f"{prefix}.shortcut.weight"), stride=stride),
                f"{prefix}.shortcut.norm",
            )
        return F.relu(out + x)

    torch.manual_seed(0)
    rgb = torch.rand(3, 64, 96)
    bgr = rgb.flip(0)[None] * 255 - torch.tensor([103.53, 116.28, 123.675])[None, :, None, None]
    x = F.relu(
        frozen_bn(F.conv2d(bgr, param("stem.conv1.weight"), stride=2, padding=3), "stem.conv1.norm")
    )
    x = F.max_pool2d(x, 3, 2, 1)
    for block in range(3):
        x = bottleneck(x, f"res2.{block}", 1)
    for block in range(4):
        x = bottleneck(x, f"res3.{block}", 2 if block == 0 else 1)
    with torch.no_grad():
        batch, _ = model.preprocess([rgb])
        features = model.backbone(batch)
    torch.testing.assert_close(features[1], x, atol=1e-3, rtol=1e-3)


def test_a_detection_checkpointer_pth_reads_as_the_pickle(model_zoo_pkl, tmp_path):
    """``DetectionCheckpointer`` saves tensors with torch.save, beside optimizer state."""
    pkl, state = model_zoo_pkl
    path = tmp_path / "model_final.pth"
    tensors = {name: torch.from_numpy(array) for name, array in state.items()}
    torch.save({"model": tensors, "iteration": 269999, "optimizer": {"state": {}}}, path)
    from_pth, from_pkl = read_weights(path), read_weights(pkl)
    assert from_pth.format == "detectron2" and from_pth.classes == COCO_CLASSES
    assert from_pth.state_dict.keys() == from_pkl.state_dict.keys()
    assert all(torch.equal(from_pth.state_dict[k], v) for k, v in from_pkl.state_dict.items())


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_arrays_and_containers_read_at_every_pickle_protocol(tmp_path, protocol):
    """Protocols 0-2 carry bytes through _codecs.encode and name builtins "__builtin__";
    protocol 5 rebuilds arrays with numpy's _frombuffer."""
    model = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), n=np.int64(7))
    data = {"model": model, "__author__": "Detectron2 Model Zoo", "tags": {"a"}, "raw": b"\x00"}
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    read = read_detectron2_pkl(path)
    assert isinstance(read["model"], OrderedDict) and read["tags"] == {"a"}
    assert read["raw"] == b"\x00" and read["model"]["n"] == 7
    np.testing.assert_array_equal(read["model"]["w"], model["w"])


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, protocol):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": Payload()}, protocol=protocol))
    with pytest.raises(ValueError, match=r"evil\.pkl.*refused global (posix|nt|os)\.system"):
        read_detectron2_pkl(path)
    assert not marker.exists()


def test_a_caffe2_pickle_is_named_not_read(tmp_path):
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"res2_0_branch2a_w": np.zeros(1)}}))
    with pytest.raises(ValueError, match="R-50.pkl.*no detectron2 parameter names"):
        read_weights(path)


def test_stride_in_1x1_is_refused_for_a_model_without_resnet_bottlenecks():
    with pytest.raises(ValueError, match="stride_in_1x1: 'test_efficientnet' is not a timm ResNet"):
        TimmBackbone("test_efficientnet", pretrained=False, stride_in_1x1=True)
