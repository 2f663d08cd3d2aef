import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision.ops.misc import FrozenBatchNorm2d

from tests.models.conftest import box_target, lean_model_config, small_model_config
from trainer.models import build_detector
from trainer.models.backbone import InputSizeError, TimmBackbone

# One small member of each family: timm's test_* models and the smallest real ones.
FAMILIES = {
    "test_resnet": {},  # ResNet
    "test_convnext": {},  # ConvNeXt
    "test_efficientnet": {},  # EfficientNet
    "test_byobnet": {},  # ByobNet (RegNet / RepVGG-style blocks)
    "test_nfnet": {},  # normalizer-free nets
    "test_mambaout": {},  # feature maps returned channels-last (NHWC)
    "test_maxvit": {"img_size": [64, 64]},  # fixed input size: batches padded to img_size
    "vit_tiny_patch16_224": {},  # plain ViT: dynamic size, one stride -> simple pyramid
    "mobilenetv3_small_050": {},  # MobileNet
    "regnetx_002": {},  # RegNet
    "cs3darknet_s": {},  # CSP nets
    "hrnet_w18_small": {},  # HRNet
    "pvt_v2_b0": {},  # hierarchical transformer
    "efficientvit_m0": {},  # strides 16..64 only: strides 4 and 8 made from 16
    "ghostnet_050": {},  # GhostNet
}
SLOW_FAMILIES = ["swin_tiny_patch4_window7_224", "densenet121", "convnext_atto", "resnet18"]


def check_train_and_eval(name: str, **backbone) -> None:
    torch.manual_seed(0)
    model = build_detector(lean_model_config(name=name, **backbone), num_classes=2)
    assert model.backbone.strides == [4, 8, 16, 32]
    image = torch.rand(3, 64, 64)
    model.train()
    losses = model([image], [box_target(64, 64, [[6, 10, 40, 50]], [1])])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # distributed training needs a gradient for every trainable parameter
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.eval()
    with torch.no_grad():
        (output,) = model([image])
    assert output["masks"].shape[1:] == (64, 64) and output["masks"].dtype == torch.bool
    assert len(output["boxes"]) == len(output["scores"]) == len(output["labels"])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_and_predicts(name):
    check_train_and_eval(name, **FAMILIES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_FAMILIES)
def test_larger_family_trains_and_predicts(name):
    check_train_and_eval(name)


def test_channels_last_maps_are_converted_to_nchw():
    backbone = TimmBackbone("test_mambaout", pretrained=False)
    assert backbone.nhwc
    images = torch.rand(2, 3, 64, 96)
    raw = backbone.body(images)  # timm's own output, NHWC
    ours = backbone(images)
    for raw_map, our_map, channels, stride in zip(raw, ours, backbone.channels, backbone.strides):
        assert our_map.shape == (2, channels, 64 // stride, 96 // stride)
        assert torch.equal(our_map, raw_map.permute(0, 3, 1, 2))


def test_plain_vit_gets_a_simple_feature_pyramid():
    backbone = TimmBackbone("test_vit", pretrained=False)
    # the deepest block only, at stride 16
    assert backbone.body.feature_info.reduction() == [16]
    assert backbone.body.feature_info.out_indices[-1] == len(backbone.body.model.blocks) - 1
    images = torch.rand(1, 3, 64, 128)
    features = backbone(images)
    shapes = [tuple(f.shape[-2:]) for f in features]
    assert shapes == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert [f.shape[1] for f in features] == backbone.channels
    (vit_map,) = backbone.body(images)
    assert torch.equal(features[2], vit_map)  # stride 16 is the ViT's own map
    assert torch.equal(features[3], torch.nn.functional.max_pool2d(vit_map, 2))


def test_out_indices_cover_strides_4_to_32():
    backbone = TimmBackbone("test_resnet", pretrained=False)
    assert backbone.body.feature_info.out_indices == (1, 2, 3, 4)  # stride 2 left out
    assert backbone.pyramid is None
    explicit = TimmBackbone("test_resnet", pretrained=False, out_indices=[2, 3, 4])
    assert explicit.strides == [8, 16, 32]


def test_fixed_size_backbone_pads_to_its_size_or_names_the_size_to_use():
    cfg = lean_model_config(name="test_maxvit", img_size=[64, 96])
    model = build_detector(cfg, num_classes=2).eval()
    assert model.backbone.fixed_size == (64, 96)
    batch, sizes = model.preprocess([torch.rand(3, 50, 70), torch.rand(3, 64, 96)])
    assert batch.shape == (2, 3, 64, 96) and sizes.tolist() == [[50, 70], [64, 96]]
    with pytest.raises(InputSizeError, match=r"64x96 only.*img_size: \[80, 96\]"):
        model.preprocess([torch.rand(3, 80, 90)])


def test_unknown_or_unsuitable_models_are_value_errors():
    with pytest.raises(ValueError, match="not a timm model"):
        TimmBackbone("resnet_does_not_exist", pretrained=False)
    with pytest.raises(ValueError, match="power-of-two strides"):
        TimmBackbone("vit_small_patch14_dinov2", pretrained=False)
    with pytest.raises(ValueError, match="img_size"):
        TimmBackbone("test_resnet", pretrained=False, img_size=[64, 64])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_loads_offline(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False)  # with its classifier
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # a training checkpoint
    backbone = TimmBackbone(
        "test_resnet", pretrained=True, checkpoint=str(path), frozen_stages=0, frozen_bn=False
    )
    expected = source.state_dict()
    for name, tensor in backbone.body.state_dict().items():
        assert torch.equal(tensor, expected[name])


def test_checkpoint_of_a_vit_loads_through_the_feature_wrapper(tmp_path):
    source = timm.create_model("test_vit", pretrained=False)
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    backbone = TimmBackbone(
        "test_vit", pretrained=False, checkpoint=str(tmp_path / "vit.safetensors")
    )
    assert torch.equal(backbone.body.model.pos_embed, source.pos_embed)
    assert torch.equal(
        backbone.body.model.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight
    )


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TimmBackbone("test_resnet", pretrained=False, checkpoint=str(tmp_path / "none.pth"))
    other = timm.create_model("test_convnext", pretrained=False)
    save_file(other.state_dict(), tmp_path / "convnext.safetensors")
    with pytest.raises(ValueError, match="does not fit timm model 'test_resnet'.*missing"):
        TimmBackbone(
            "test_resnet", pretrained=False, checkpoint=str(tmp_path / "convnext.safetensors")
        )
    wider = timm.create_model("test_resnet", pretrained=False, stem_width=48)
    save_file(wider.state_dict(), tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match="of other shapes"):
        TimmBackbone(
            "test_resnet", pretrained=False, checkpoint=str(tmp_path / "wider.safetensors")
        )
    # weights_only refuses arbitrary pickled objects
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")
    with pytest.raises(ValueError, match="could not be read as weights"):
        TimmBackbone("test_resnet", pretrained=False, checkpoint=str(tmp_path / "module.pth"))


def test_frozen_stages_stop_gradients_and_batchnorm_statistics():
    backbone = TimmBackbone("test_resnet", pretrained=False, frozen_stages=1, frozen_bn=False)
    frozen = {n for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1")) for n in frozen)
    assert all(
        p.requires_grad for n, p in backbone.body.named_parameters() if n.startswith("layer2")
    )
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.body.layer2[0].bn1, torch.nn.BatchNorm2d)


def test_frozen_stages_of_a_vit_freeze_the_embedding_and_first_block():
    backbone = TimmBackbone("test_vit", pretrained=False, frozen_stages=1)
    vit = backbone.body.model
    assert not vit.pos_embed.requires_grad and not vit.patch_embed.proj.weight.requires_grad
    assert not any(p.requires_grad for p in vit.blocks[0].parameters())
    assert all(p.requires_grad for p in vit.blocks[1].parameters())


def test_batchnorm_options():
    default = TimmBackbone("test_resnet", pretrained=False)  # random init: BN trains
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules())
    frozen = TimmBackbone("test_resnet", pretrained=False, frozen_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    synced = TimmBackbone("test_resnet", pretrained=False, frozen_bn=False, sync_bn=True)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    synced(torch.rand(2, 3, 64, 64))  # one process: plain BatchNorm behaviour
    with pytest.raises(ValueError, match="sync_bn"):
        TimmBackbone("test_resnet", pretrained=False, frozen_bn=True, sync_bn=True)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_normalization_comes_from_the_pretrained_config(name):
    """timm's pretrained config sets the input normalization (0.5/0.5 for test_resnet,
    ImageNet's for test_efficientnet), also when the weights are not loaded."""
    config = timm.get_pretrained_cfg(name)
    assert (name == "test_resnet") == (config.mean != timm.data.IMAGENET_DEFAULT_MEAN)
    model = build_detector(small_model_config(name=name), num_classes=2)
    assert model.pixel_mean.flatten().tolist() == pytest.approx(list(config.mean))
    assert model.pixel_std.flatten().tolist() == pytest.approx(list(config.std))


def test_a_pretrained_tag_brings_its_own_normalization():
    """``arch.tag`` takes that tag's config: mobilenetv3_large_100.miil_in21k was trained on
    unnormalized [0, 1] inputs, the architecture's default weights on ImageNet's statistics."""
    name = "mobilenetv3_large_100.miil_in21k"
    config = timm.get_pretrained_cfg(name)
    assert config.mean != timm.get_pretrained_cfg(name.split(".")[0]).mean
    model = build_detector(small_model_config(name=name), num_classes=2)
    assert model.pixel_mean.flatten().tolist() == pytest.approx(list(config.mean))
    assert model.pixel_std.flatten().tolist() == pytest.approx(list(config.std))


def test_fixed_input_size_comes_from_the_pretrained_config():
    """Without img_size, a model that takes one size only is padded to its pretrained
    config's input size (160 px for test_maxvit, not timm's 224 fallback)."""
    config = timm.get_pretrained_cfg("test_maxvit")
    assert config.fixed_input_size and tuple(config.input_size[1:]) != (224, 224)
    backbone = TimmBackbone("test_maxvit", pretrained=False)
    assert backbone.fixed_size == tuple(config.input_size[1:])
