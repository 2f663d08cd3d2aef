"""The val phase: COCO metrics and validation losses in one pass over the val loader."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from timm.layers import DropPath
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torchvision.transforms.v2 import functional as TF

from trainer.evaluation.coco import CocoEvaluator
from trainer.evaluation.inference import inference_batches
from trainer.seeding import private_random_stream
from trainer.visualize import draw_instances

# Layers that behave differently in training mode for reasons other than the detector's own
# logic: normalization (batch statistics, running-stat updates) and stochastic regularizers.
_EVAL_LAYERS = (_NormBase, _DropoutNd, DropPath)


@contextlib.contextmanager
def loss_mode(model: nn.Module) -> Iterator[None]:
    """Training-mode forward (the detector returns losses only then) that changes nothing.

    Normalization and dropout layers are put in eval mode rather than saving and restoring
    their buffers: BatchNorm then normalizes with its running statistics, as at inference,
    and never updates them, so the val loss measures the model that is evaluated. Every
    module's mode is restored afterwards.
    """
    modes = {module: module.training for module in model.modules()}
    model.train()
    for module in model.modules():
        if isinstance(module, _EVAL_LAYERS):
            module.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@dataclass
class ValResult:
    """``metrics``: COCO metrics (``segm/AP``, ...); ``losses``: mean per image of each loss
    and their sum ``loss``; ``num_images``: distinct images evaluated over all processes;
    ``num_detections``: detections scored, over all processes; ``images``: up to the
    requested number of (uint8 [3, H, W] image at its original size, prediction dict) pairs
    from the main process."""

    metrics: dict[str, float]
    losses: dict[str, float]
    num_images: int
    num_detections: int
    images: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=list)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader,
    evaluator: CocoEvaluator,
    accelerator: Accelerator,
    seed: int,
    keep_images: int = 0,
    desc: str = "val",
) -> ValResult:
    """Predictions (:func:`inference_batches`) and val losses (see :func:`loss_mode`) for
    every batch of ``loader`` (images, targets with ``boxes``, ``labels``, ``masks``,
    ``image_id``, ``orig_size``).

    ``model`` may be the prepared one, whose forward can be a collective (FSDP): the prepared
    loader gives every process the same number of batches. The losses sample proposals at
    random; they run on a private random stream seeded with ``seed``, so every val phase
    draws the same samples and the training random state is left exactly as it was (a run
    with val phases logs the same training losses as one without). Results of all processes
    are gathered; the padding that evens out the last batches is dropped. The model is left
    in the mode it came in.
    """
    sums: torch.Tensor | None = None
    names: list[str] = []
    count = 0
    image_ids: list[torch.Tensor] = []
    kept: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    was_training = model.training
    evaluator.reset()
    with private_random_stream(seed, accelerator.device):
        for images, targets, outputs in inference_batches(model, loader, accelerator, desc):
            ids = [t["image_id"] for t in targets]
            evaluator.process(ids, outputs)
            image_ids.append(
                accelerator.gather_for_metrics(torch.tensor(ids, device=accelerator.device))
            )
            if accelerator.is_main_process and len(kept) < keep_images:
                for image, target, output in zip(images, targets, outputs, strict=True):
                    if len(kept) < keep_images:
                        original = TF.resize(image, list(target["orig_size"]), antialias=True)
                        kept.append((original.cpu(), {k: v.cpu() for k, v in output.items()}))

            with loss_mode(model), accelerator.autocast():
                losses = model(images, targets)
            names = list(losses)
            # One row per image, so that gathering drops the padded duplicates exactly.
            row = torch.stack([value.detach().float() for value in losses.values()])
            rows = accelerator.gather_for_metrics(row.expand(len(images), -1).contiguous())
            sums = rows.sum(0) if sums is None else sums + rows.sum(0)
            count += len(rows)
    model.train(was_training)
    metrics = evaluator.evaluate()
    means = {} if sums is None else dict(zip(names, (sums / count).tolist(), strict=True))
    if means:
        means["loss"] = sum(means.values())
    num_images = len(torch.cat(image_ids).unique()) if image_ids else 0
    return ValResult(metrics, means, num_images, len(evaluator.results()), kept)


def draw_predictions(
    pairs: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    class_names: Sequence[str],
    with_masks: bool = True,
) -> list[torch.Tensor]:
    """(image, prediction) pairs -> uint8 [3, H, W] images with boxes (and masks) drawn.

    ``with_masks`` False leaves the masks out (a boxes-only dataset never trains them)."""
    return [
        draw_instances(
            image,
            output["boxes"],
            output["labels"],
            output["scores"],
            output["masks"] if with_masks else None,
            class_names,
        )
        for image, output in pairs
    ]
