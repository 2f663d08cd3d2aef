"""The inference loop: the one pass of a detector over a loader that the val phase,
``trainer.evaluate`` and ``trainer.predict`` share."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm


@torch.no_grad()
def inference_batches(
    model: torch.nn.Module, loader, accelerator: Accelerator, desc: str = "inference"
) -> Iterator[tuple[list[torch.Tensor], list[dict], list[dict[str, torch.Tensor]]]]:
    """Yield ``(images, targets, outputs)`` for every batch of ``loader``.

    ``loader`` gives (list of [3, h, w] images, list of dicts with ``orig_size``, the
    (height, width) to return results at, plus whatever the caller needs: ``image_id``,
    ``boxes``, ...). ``outputs`` holds, per image, ``boxes`` [D, 4] xyxy, ``labels`` [D],
    ``scores`` [D] and ``masks`` bool [D, H, W] at ``orig_size``, on the model's device.

    The model runs in eval mode under the accelerator's autocast, with a progress bar on the
    main process; between batches the caller's code runs with its own modes (the val phase
    computes its losses there). The model is left in eval mode.
    """
    with tqdm(
        total=len(loader), desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True
    ) as bar:
        for images, targets in loader:
            model.eval()
            with accelerator.autocast():
                outputs = model(images, output_sizes=[t["orig_size"] for t in targets])
            yield images, targets, outputs
            bar.update(1)
