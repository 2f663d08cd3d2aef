"""Any timm model as a multi-scale feature extractor."""

from __future__ import annotations

import timm
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn

from trainer.config import RecipeError

WANTED_STRIDES = (4, 8, 16, 32)


def _choose_out_indices(feature_info) -> list[int]:
    """The deepest feature of each stride in 4..32 the model has."""
    by_stride: dict[int, int] = {}
    for index, stride in enumerate(feature_info.reduction()):
        if stride in WANTED_STRIDES:
            by_stride[stride] = index
    if not by_stride:
        raise RecipeError(
            f"backbone has no features at strides {WANTED_STRIDES} "
            f"(it has {feature_info.reduction()})."
        )
    return [by_stride[s] for s in sorted(by_stride)]


class TimmBackbone(nn.Module):
    """``timm.create_model(name, features_only=True)`` with freezing options.

    forward: images [B, 3, H, W] (normalized) -> list of feature maps [B, C_i, H/s_i, W/s_i].
    Attributes ``channels`` and ``strides`` describe the outputs; ``mean`` and ``std`` are
    the normalization of the model's pretrained config.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool,
        frozen_stages: int | None = None,
        frozen_bn: bool | None = None,
        out_indices: list[int] | None = None,
    ):
        super().__init__()
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise RecipeError(
                f"model.backbone.name '{name}' is not a timm model. Similar names: {close}"
            )
        if out_indices is None:
            probe = timm.create_model(name, pretrained=False, features_only=True)
            out_indices = _choose_out_indices(probe.feature_info)
            del probe
        self.body = timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices)
        )
        info = self.body.feature_info
        self.channels = list(info.channels())
        self.strides = list(info.reduction())
        data_cfg = timm.data.resolve_data_config({}, model=self.body)
        self.mean = tuple(data_cfg["mean"])
        self.std = tuple(data_cfg["std"])

        if frozen_stages is None:
            frozen_stages = 1 if pretrained else 0
        if frozen_bn is None:
            frozen_bn = pretrained
        self._freeze_stages(frozen_stages)
        if frozen_bn:
            self.body = freeze_batch_norm_2d(self.body)

    def _freeze_stages(self, num_stages: int) -> None:
        """Stop gradients into the stem and the first ``num_stages`` stages (stride >= 4)."""
        if num_stages <= 0:
            return
        stage_modules = [
            entry["module"] for entry in self.body.feature_info.info if entry["reduction"] >= 4
        ]
        target = stage_modules[min(num_stages, len(stage_modules)) - 1]
        # features_only wrappers flatten top-level modules ("stages.0" -> "stages_0") but keep
        # deeper ones ("blocks.0" inside "blocks"); parameters come in forward order, so
        # freeze everything up to the end of the target stage.
        prefixes = (target + ".", target.replace(".", "_") + ".")
        inside = False
        for name, param in self.body.named_parameters():
            in_target = name.startswith(prefixes)
            if inside and not in_target:
                break
            inside |= in_target
            param.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.body(images)


def describe(backbone: TimmBackbone) -> str:
    frozen = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in backbone.parameters())
    return (
        f"strides {backbone.strides}, channels {backbone.channels}, "
        f"{total / 1e6:.1f}M parameters ({frozen / 1e6:.1f}M frozen)"
    )
