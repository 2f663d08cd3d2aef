"""A trained detector compiled for inference."""

from __future__ import annotations

from torch import nn


def compile_for_inference(model: nn.Module, dynamic: bool | None = None) -> nn.Module:
    """Compile the backbone, the FPN and the RPN head in place (inductor, weights frozen).

    With freezing, inductor takes the weights as constants (pre-packed for oneDNN on the
    CPU) and fuses the elementwise work between convolutions (frozen BatchNorm, ReLU,
    residual adds, upsampling adds) into the kernels around them. Detections are the same up
    to float rounding; benchmarks/README.md measures the speed.

    For a model that is done training: the compiled parts keep the weights they had at
    their first call under ``torch.no_grad()``, so load weights first and do not train or
    load others afterwards. The first call at each new input size compiles (about a minute
    on a 2-core CPU); from the second size on, shapes are compiled as dynamic. The RoI
    heads stay eager: their RoI counts change from call to call.

    Args:
        model: a MaskRCNN, in eval mode when called.
        dynamic: torch.compile's ``dynamic`` (None: static first, dynamic once a shape
            changes).
    Returns:
        ``model`` itself.
    """
    for part in (model.backbone, model.fpn, model.rpn.head):
        part.compile(dynamic=dynamic, options={"freezing": True})
    return model
