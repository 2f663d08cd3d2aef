"""Any timm model as a multi-scale feature extractor at strides 4..32."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from omegaconf import DictConfig
from timm.layers import Format, convert_sync_batchnorm, freeze_batch_norm_2d
from timm.models import get_model_input_config
from timm.models._features import FeatureGetterNet, FeatureHookNet
from timm.utils import freeze
from torch import Tensor, nn

from trainer.models.simple_pyramid import SimplePyramid
from trainer.registry import Registry

WANTED_STRIDES = (4, 8, 16, 32)


def _create(name: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, features_only=True, **kwargs)
    except RuntimeError as exc:
        if "features_only" in str(exc):
            raise ValueError(
                f"timm model '{name}' cannot return its feature maps ({exc}). Pick another model."
            ) from None
        raise


def _probe(name: str, **kwargs) -> nn.Module:
    """The feature wrapper without weights: on the meta device (no memory, no init) where
    the model allows it, else on the CPU."""
    try:
        with torch.device("meta"):
            return _create(name, **kwargs)
    except Exception:  # a model whose __init__ needs real tensors; other errors come again
        return _create(name, **kwargs)


def _is_fixed_size(body: nn.Module) -> bool:
    return bool(get_model_input_config(body)["fixed_input_size"])


def _choose_out_indices(name: str, feature_info) -> list[int]:
    """The deepest feature of each stride in 4..32 the model has (timm's indices)."""
    by_stride: dict[int, int] = {}
    for index, stride in zip(feature_info.out_indices, feature_info.reduction()):
        if stride in WANTED_STRIDES:
            by_stride[stride] = index
    if not by_stride:
        raise ValueError(
            f"timm model '{name}' has feature strides {feature_info.reduction()}; "
            f"the detector needs maps at power-of-two strides among {WANTED_STRIDES} "
            "(e.g. a patch-16 ViT rather than a patch-14 one)."
        )
    return [by_stride[s] for s in sorted(by_stride)]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _key(name: str) -> str:
    # timm's feature wrappers rename "stages.0" to "stages_0"; compare names with both
    # separators made the same.
    return name.replace("_", ".")


def move_stride_to_1x1(model: nn.Module, name: str) -> None:
    """Downsample in each strided ResNet bottleneck's first 1x1 conv instead of its 3x3
    (MSRA / Caffe2 ResNets: detectron2's ``STRIDE_IN_1X1``). Same parameters, other maps.

    Only timm's ResNet ``Bottleneck`` (conv1 1x1, conv2 3x3 with the stride, conv3 1x1);
    a ValueError for any other model, and for anti-aliased ones (their stride is in ``aa``).
    """
    blocks = [m for m in model.modules() if isinstance(m, timm.models.resnet.Bottleneck)]
    strided = [block for block in blocks if block.conv2.stride != (1, 1)]
    if not strided:
        raise ValueError(
            f"stride_in_1x1: '{name}' is not a timm ResNet whose bottleneck blocks downsample "
            "in their 3x3 conv (timm.models.resnet.Bottleneck)."
        )
    for block in strided:
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


class TimmBackbone(nn.Module):
    """``timm.create_model(name, features_only=True)`` with weights, freezing and norm options.

    forward: images [B, 3, H, W] (normalized) -> list of feature maps [B, C_i, H/s_i, W/s_i]
    in NCHW, for strides 4, 8, 16, 32 (maps the model lacks are made by a SimplePyramid;
    explicit ``out_indices`` are used as given). Attributes: ``channels``, ``strides``;
    ``mean`` and ``std``, the normalization of the model's pretrained config;
    ``fixed_size`` (height, width) for models that take one input size only, else None.

    Args:
        pretrained: timm's own download of the weights.
        checkpoint: local .safetensors / .pth state dict of the timm model ``name``,
            loaded offline (with weights_only); takes the place of ``pretrained``.
        frozen_stages: stem plus this many stages get no gradient and frozen BatchNorm;
            None: 1 with weights, else 0.
        frozen_bn: every BatchNorm a frozen affine map; None: with weights, else not.
        sync_bn: BatchNorm layers that train are synchronized across processes (multi-GPU).
        img_size: input size to build the model for (timm's ``img_size``); models with a
            fixed input size take batches padded to it.
        mean, std: input normalization (RGB, [0, 1]) instead of the pretrained config's.
        stride_in_1x1: ResNet bottlenecks downsample in their 1x1 conv (MSRA style).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool,
        checkpoint: str | None = None,
        frozen_stages: int | None = None,
        frozen_bn: bool | None = None,
        sync_bn: bool = False,
        out_indices: list[int] | None = None,
        img_size: list[int] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"'{name}' is not a timm model. Similar names: {close}")
        self.name = name
        kwargs = {"img_size": tuple(img_size)} if img_size is not None else {}
        try:
            probe = _probe(name, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            raise ValueError(
                f"img_size: timm model '{name}' takes any input size and has "
                "no img_size argument; leave it null."
            ) from None
        if _is_fixed_size(probe):
            # Transformers with position tables take other sizes when timm can resize them.
            try:
                dynamic = _probe(name, dynamic_img_size=True, **kwargs)
            except TypeError:
                dynamic = None
            if dynamic is not None and not _is_fixed_size(dynamic):
                kwargs["dynamic_img_size"] = True
        automatic = out_indices is None
        if automatic:
            out_indices = _choose_out_indices(name, probe.feature_info)
        del probe

        with_weights = pretrained or checkpoint is not None
        self.body = _create(
            name,
            pretrained=pretrained and checkpoint is None,
            out_indices=tuple(out_indices),
            **kwargs,
        )
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        info = self.body.feature_info
        channels, strides = list(info.channels()), list(info.reduction())
        self.nhwc = getattr(self.body, "output_fmt", Format.NCHW) == Format.NHWC
        input_cfg = get_model_input_config(self.body)
        self.fixed_size = tuple(input_cfg["input_size"][1:]) if _is_fixed_size(self.body) else None
        data_cfg = timm.data.resolve_data_config({}, model=self.body)
        self.mean = tuple(mean) if mean is not None else tuple(data_cfg["mean"])
        self.std = tuple(std) if std is not None else tuple(data_cfg["std"])
        if stride_in_1x1:
            move_stride_to_1x1(self.body, name)

        self.pyramid = None
        if automatic and strides != list(WANTED_STRIDES):
            self.pyramid = SimplePyramid(channels, strides, WANTED_STRIDES)
            channels, strides = self.pyramid.channels, self.pyramid.strides
        self.channels, self.strides = channels, strides

        if frozen_stages is None:
            frozen_stages = 1 if with_weights else 0
        if frozen_bn is None:
            frozen_bn = with_weights
        if sync_bn and frozen_bn:
            raise ValueError("sync_bn needs BatchNorm that trains: set frozen_bn: false.")
        self._freeze_stages(frozen_stages)
        if frozen_bn:
            self.body = freeze_batch_norm_2d(self.body)
        elif sync_bn:
            self.body = convert_sync_batchnorm(self.body)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TimmBackbone:
        """``model.backbone`` node -> TimmBackbone."""
        return cls(
            name=cfg.name,
            pretrained=cfg.pretrained,
            checkpoint=cfg.checkpoint,
            frozen_stages=cfg.frozen_stages,
            frozen_bn=cfg.frozen_bn,
            sync_bn=cfg.sync_bn,
            out_indices=list(cfg.out_indices) if cfg.out_indices is not None else None,
            img_size=list(cfg.img_size) if cfg.img_size is not None else None,
            mean=list(cfg.mean) if cfg.mean is not None else None,
            std=list(cfg.std) if cfg.std is not None else None,
            stride_in_1x1=cfg.stride_in_1x1,
        )

    def _wrapper_prefix(self) -> str:
        """Prefix the feature wrapper puts before the model's own parameter names."""
        if isinstance(self.body, FeatureGetterNet):
            return "model."
        if isinstance(self.body, FeatureHookNet) and "body" in self.body:
            return "body."
        return ""

    def _load_checkpoint(self, path: str) -> None:
        """Load a state dict of the timm model into the feature extractor.

        Every tensor the extractor has must be in the file with the same shape; the file
        may hold more (the classifier, stages past the last feature used).
        """
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"checkpoint '{path}' does not exist.")
        try:
            state = timm.models.load_state_dict(str(file), weights_only=True)
        except Exception as exc:  # unpickling and safetensors errors vary by format
            raise ValueError(
                f"checkpoint '{path}' could not be read as weights "
                f"(.safetensors or a .pth state dict): {exc}"
            ) from None
        available = {_key(k): v for k, v in state.items() if isinstance(v, Tensor)}
        prefix = self._wrapper_prefix()
        loaded, missing, wrong_shape = {}, [], []
        for name, tensor in self.body.state_dict().items():
            source = available.get(_key(name.removeprefix(prefix)))
            if source is None:
                if not name.endswith("num_batches_tracked"):
                    missing.append(name.removeprefix(prefix))
            elif source.shape != tensor.shape:
                wrong_shape.append(
                    f"{name.removeprefix(prefix)} {tuple(source.shape)} vs {tuple(tensor.shape)}"
                )
            else:
                loaded[name] = source
        if missing or wrong_shape:
            problems = []
            if missing:
                problems.append(f"{len(missing)} tensors missing, e.g. {missing[:5]}")
            if wrong_shape:
                problems.append(f"{len(wrong_shape)} of other shapes, e.g. {wrong_shape[:3]}")
            raise ValueError(
                f"checkpoint '{path}' does not fit timm model '{self.name}': "
                f"{'; '.join(problems)}. The file holds keys like {list(state)[:5]}; it must "
                f"be a state dict of '{self.name}' as timm names it."
            )
        self.body.load_state_dict(loaded, strict=False)

    def _freeze_stages(self, num_stages: int) -> None:
        """Stop gradients into the stem and the first ``num_stages`` stages (the features at
        stride >= 4, in order), and freeze their BatchNorm statistics."""
        if num_stages <= 0:
            return
        stages = [e["module"] for e in self.body.feature_info.info if e["reduction"] >= 4]
        target = _key(stages[min(num_stages, len(stages)) - 1])
        prefix = self._wrapper_prefix()
        # Parameters come in forward order: freeze all up to the end of the target stage.
        frozen: list[str] = []
        inside = False
        for name, _ in self.body.named_parameters():
            key = _key(name.removeprefix(prefix))
            in_target = key.startswith(target + ".")
            if inside and not in_target:
                break
            inside |= in_target
            frozen.append(name)
        if not inside:
            raise ValueError(
                f"frozen_stages: no parameters of stage '{target}' found in "
                f"'{self.name}'; set frozen_stages: 0 and freeze by hand."
            )
        frozen_set = set(frozen)
        # Modules whose parameters are all frozen go through timm's freeze (parameters and
        # BatchNorm statistics); parameters that sit on a module with trainable ones too (a
        # ViT's position table) just stop their gradient.
        owners = [
            module_name
            for module_name, module in self.body.named_modules()
            if module_name
            and (names := [f"{module_name}.{n}" for n, _ in module.named_parameters()])
            and frozen_set.issuperset(names)
        ]
        freeze(self.body, owners)
        for name, param in self.body.named_parameters():
            if name in frozen_set:
                param.requires_grad_(False)

    def block_classes(self) -> list[str]:
        """Class names of the backbone's building blocks, for sharding units: each stage
        timm reports a feature from, or its blocks when the stage is a plain container
        (a ResNet's ``layer1`` is an ``nn.Sequential`` of ``Bottleneck``)."""
        modules = {_key(name): module for name, module in self.body.named_modules()}
        prefix = _key(self._wrapper_prefix())
        names: list[str] = []
        for entry in self.body.feature_info.info:
            module = modules.get(prefix + _key(entry["module"]))
            if module is None or not _has_parameters(module):
                continue
            if isinstance(module, nn.Sequential | nn.ModuleList):
                blocks = [child for child in module.children() if _has_parameters(child)]
            else:
                blocks = [module]
            names += [type(block).__name__ for block in blocks]
        return sorted(set(names))

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.body(images)
        if self.nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        if self.pyramid is not None:
            features = self.pyramid(features)
        return features


BACKBONES = Registry("backbone", {"TimmBackbone": TimmBackbone})


class InputSizeError(ValueError):
    """Images larger than a backbone that takes one input size. Met during training or
    inference, not while building, so the message names the recipe keys that fix it."""


def fixed_input_size(backbone: TimmBackbone, height: int, width: int) -> tuple[int, int]:
    """The size to pad a batch of at most ``height`` x ``width`` images to for a backbone
    that takes one input size only; an :class:`InputSizeError` if they do not fit."""
    fixed_height, fixed_width = backbone.fixed_size
    if height > fixed_height or width > fixed_width:
        raise InputSizeError(
            f"backbone '{backbone.name}' takes inputs of {fixed_height}x{fixed_width} only, and "
            f"this batch has images up to {height}x{width}: set model.backbone.img_size: "
            f"[{max(height, fixed_height)}, {max(width, fixed_width)}] (or larger), or make "
            "images smaller (data.*.min_size / max_size)."
        )
    return fixed_height, fixed_width


def describe(backbone: TimmBackbone) -> str:
    frozen = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in backbone.parameters())
    return (
        f"strides {backbone.strides}, channels {backbone.channels}, "
        f"{total / 1e6:.1f}M parameters ({frozen / 1e6:.1f}M frozen)"
    )
