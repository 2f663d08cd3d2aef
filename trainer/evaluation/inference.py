"""Inference over a loader, feeding an evaluator."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from trainer.evaluation.coco import CocoEvaluator


@torch.no_grad()
def evaluate_on_loader(
    model: torch.nn.Module,
    loader,
    evaluator: CocoEvaluator,
    accelerator: Accelerator,
    desc: str = "val",
    per_class: bool = False,
) -> dict[str, float]:
    """Run the model in eval mode over ``loader`` (batches of images and targets with
    ``image_id`` and ``orig_size``) and return the evaluator's metrics on every process
    (with per-class AP when ``per_class``).

    Results are produced at each image's original size, as the annotation file has it.
    """
    model.eval()
    evaluator.reset()
    for images, targets in tqdm(
        loader, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True
    ):
        with accelerator.autocast():
            outputs = model(images, output_sizes=[t["orig_size"] for t in targets])
        evaluator.process([t["image_id"] for t in targets], outputs)
    return evaluator.evaluate(per_class=per_class)
