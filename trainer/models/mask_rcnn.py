"""Mask R-CNN: timm backbone + FPN + RPN + RoI heads, with torchvision's model contract."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from trainer.models.backbone import BACKBONES, TimmBackbone, fixed_input_size
from trainer.models.fpn import FPN
from trainer.models.roi_heads import RoIHeads
from trainer.models.rpn import RegionProposalNetwork
from trainer.ops.masks import paste_masks
from trainer.registry import build, build_part


def check_images(images: list[Tensor]) -> None:
    """A list of [3, H, W] tensors, as torchvision's detection models take."""
    if not isinstance(images, list | tuple):
        raise ValueError(
            f"images must be a list of [3, H, W] tensors, got {type(images).__name__}."
        )
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image {i} must be a [3, H, W] tensor, got {shape}.")


def check_targets(images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
    """Training targets as torchvision checks them: ``boxes`` float [N, 4] with x1 > x0 and
    y1 > y0, ``labels`` int64 [N], ``masks`` (when given) [N, H, W] of the image's size.
    One host read per batch, for the degenerate-box test."""
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets.")
    degenerate = []
    for i, (image, target) in enumerate(zip(images, targets)):
        boxes = target.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            shape = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"target {i}: boxes must be a tensor of shape [N, 4], got {shape}.")
        if not boxes.is_floating_point():
            raise ValueError(f"target {i}: boxes must be a float tensor, got {boxes.dtype}.")
        labels = target.get("labels")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"target {i}: labels must have shape [{len(boxes)}], got {shape}.")
        # Float labels would be truncated silently when stacked into the int64 batch.
        if labels.dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be an int64 tensor, got {labels.dtype}.")
        masks = target.get("masks")
        size = [len(boxes), *image.shape[-2:]]
        if masks is not None and (not isinstance(masks, Tensor) or list(masks.shape) != size):
            shape = list(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"target {i}: masks must be [N, H, W] = {size}, got {shape}.")
        # Written as not (x1 > x0) so that a NaN coordinate counts as degenerate too.
        degenerate.append(~(boxes[:, 2:] > boxes[:, :2]).all(dim=1))
    if degenerate and torch.cat([d.to(degenerate[0].device) for d in degenerate]).any():
        # The error path: find the first target and box to name.
        i = next(i for i, d in enumerate(degenerate) if d.any())
        box = targets[i]["boxes"][degenerate[i].nonzero()[0, 0]]
        raise ValueError(
            "All bounding boxes should have positive height and width. Found invalid "
            f"box {box.tolist()} for target at index {i}."
        )


# Mask pasting: this project's exact paste, or torchvision's (for its weights' detections).
PASTE_MODES = ("exact", "torchvision")
# Autocast dtype of inference (model.inference_precision); fp32: no autocast; auto: see
# inference_dtype.
INFERENCE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (avx512_bf16, AMX): there bf16
    convolutions and matrix products are faster than fp32; elsewhere they are emulated and
    slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_dtype(precision: str, device_type: str) -> torch.dtype:
    """The autocast dtype of ``model.inference_precision`` on a device. ``auto``: bf16 on a
    CPU with native bf16 (1.6-1.7x faster there for <= 0.15 AP on the demo set; see
    benchmarks/README.md), fp32 elsewhere (GPUs: not measured yet)."""
    if precision == "auto":
        native = device_type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return INFERENCE_PRECISIONS[precision]


class MaskRCNN(nn.Module):
    """Instance segmentation model.

    forward(images, targets=None, output_sizes=None):
        images: list of [3, H, W] images, float in [0, 1] or uint8; normalized and padded
            to a multiple of ``size_divisibility`` here.
        targets (training): list of dicts with ``boxes`` [N, 4] xyxy pixels, ``labels``
            [N] int64 in 1..K, ``masks`` [N, H, W] uint8.
        output_sizes (inference): (height, width) per image to return results at, e.g. the
            original size when the images were resized; default: each input's own size.
    Returns:
        training: dict of scalar losses (loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox,
        loss_mask). Inference: per image a dict with ``boxes`` [D, 4], ``labels`` [D],
        ``scores`` [D] and ``masks`` [D, H, W] bool.

    Anchors, box coding, proposal selection, matching, RoI level assignment and the final
    detections equal torchvision's on the same inputs. Deliberate differences, as in
    Detectron2 (each checked against torchvision in the tests): RoIAlign is aligned (half-
    pixel offset) with adaptive sampling, and so are the mask targets; box losses are L1,
    divided by the number of sampled anchors / RoIs per batch; a ground truth box that
    overlaps no anchor gets no forced match; masks are pasted at the exact (sub-pixel) box;
    images are padded, not resized (resizing belongs to the data pipeline).
    """

    def __init__(
        self,
        backbone: TimmBackbone,
        fpn: FPN,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        mask_thresh: float = 0.5,
        size_divisibility: int | None = None,
        mask_paste: str = "exact",
        channels_last: bool | None = None,
        inference_precision: str = "auto",
    ):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.mask_thresh = mask_thresh
        if mask_paste not in PASTE_MODES:
            raise ValueError(f"mask_paste must be one of {list(PASTE_MODES)}, got {mask_paste!r}.")
        self.mask_paste = mask_paste
        # Memory format of the image batch, which the convolutions keep: channels-last
        # (NHWC) or NCHW; None: channels-last on the CPU (faster oneDNN kernels, RoIAlign and
        # the RPN head's outputs without copies), NCHW elsewhere.
        self.channels_last = channels_last
        if inference_precision not in ("auto", *INFERENCE_PRECISIONS):
            raise ValueError(
                f"inference_precision must be one of {['auto', *INFERENCE_PRECISIONS]}, "
                f"got {inference_precision!r}."
            )
        # Convolutions and matrix products at inference in this dtype (autocast; "auto":
        # bf16 on CPUs with native bf16, else fp32); box decoding, scores, RoIAlign and mask
        # probabilities stay fp32.
        self.inference_precision = inference_precision
        self.num_classes = roi_heads.num_classes
        # None: the coarsest stride, so that every pyramid level divides the padded size.
        self.size_divisibility = size_divisibility or max(self.fpn.strides)
        # Units FSDP shards apart, by class name (Accelerate's TRANSFORMER_BASED_WRAP reads
        # them when the config names no classes): backbone blocks, the pyramid and each head.
        # Each is entered through its forward, where FSDP gathers its parameters.
        units = [self.fpn, self.rpn, self.roi_heads.box_head, self.roi_heads.mask_head]
        if backbone.pyramid is not None:
            units.append(backbone.pyramid)
        self._no_split_modules = sorted(
            set(backbone.block_classes()) | {type(unit).__name__ for unit in units}
        )
        self.register_buffer("pixel_mean", torch.tensor(backbone.mean).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(backbone.std).view(3, 1, 1), False)

    @classmethod
    def from_config(cls, cfg: DictConfig, num_classes: int | None = None) -> MaskRCNN:
        """``model`` node -> MaskRCNN; ``num_classes`` stands in for a null ``num_classes``."""
        num_classes = cfg.num_classes if cfg.num_classes is not None else num_classes
        if num_classes is None:
            raise ValueError("num_classes is not set and no dataset gave the class count.")
        backbone = build(BACKBONES, cfg.backbone)
        fpn = FPN(backbone.channels, backbone.strides, cfg.fpn_channels)
        return cls(
            backbone,
            fpn,
            build_part(
                RegionProposalNetwork, cfg.rpn, channels=fpn.out_channels, strides=fpn.strides
            ),
            # The RoI heads pool from P2-P5; P6 only feeds the RPN.
            build_part(
                RoIHeads,
                cfg.roi_heads,
                channels=fpn.out_channels,
                strides=backbone.strides,
                num_classes=num_classes,
            ),
            mask_thresh=cfg.roi_heads.mask_thresh,
            mask_paste=cfg.roi_heads.mask_paste,
            size_divisibility=cfg.size_divisibility,
            channels_last=cfg.channels_last,
            inference_precision=cfg.inference_precision,
        )

    def forward(
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        output_sizes: list[tuple[int, int]] | None = None,
    ):
        check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("MaskRCNN in training mode needs targets.")
            check_targets(images, targets)
        batch, image_sizes = self.preprocess(images)
        with self._autocast(batch.device.type):
            pyramid = self.fpn(self.backbone(batch))
            gt = self.pad_targets(targets, batch.shape[-2:]) if self.training else None
            proposals, valid, losses = self.rpn(pyramid, image_sizes, gt)
            if self.training:
                losses.update(self.roi_heads(pyramid[:-1], proposals, valid, gt))
                return losses
            detections = self.roi_heads(pyramid[:-1], proposals, valid, image_sizes=image_sizes)
        if output_sizes is None:
            output_sizes = [tuple(image.shape[-2:]) for image in images]
        return self.postprocess(detections, image_sizes, output_sizes)

    @contextlib.contextmanager
    def keeping_scores(self, at_least: float):
        """Within: detections scoring below ``at_least`` are dropped before their masks are
        made, not after (as a caller's own filter would), which spares the mask head and the
        pasting for what the caller throws away. The detections scoring ``at_least`` or
        more are the same: NMS only suppresses boxes by higher-scoring ones, and the
        per-image cut keeps the best. Changes the model for the duration: not for one model
        shared by threads that ask for different thresholds."""
        own = self.roi_heads.score_thresh
        # The fp32 value just below: "score > it" keeps exactly "score >= at_least".
        below = torch.nextafter(torch.tensor(at_least), torch.tensor(-math.inf)).item()
        self.roi_heads.score_thresh = max(own, below)
        try:
            yield
        finally:
            self.roi_heads.score_thresh = own

    def _autocast(self, device_type: str):
        """Autocast to ``inference_precision`` at inference; nothing in training (the training
        loop's mixed precision applies) or in fp32 (an enclosing autocast still applies)."""
        if self.training:
            return contextlib.nullcontext()
        dtype = inference_dtype(self.inference_precision, device_type)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Normalize and pad into one batch: -> [B, 3, H_pad, W_pad], sizes [B, 2] (h, w).

        Padding is at the bottom and right, to a multiple of ``size_divisibility``, or to
        the input size of a backbone that takes one size only. The batch is channels-last
        when ``channels_last`` says so.
        """
        sizes = [tuple(image.shape[-2:]) for image in images]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        if self.backbone.fixed_size is not None:
            height, width = fixed_input_size(self.backbone, height, width)
        else:
            divisor = self.size_divisibility
            height, width = -(-height // divisor) * divisor, -(-width // divisor) * divisor
        device = self.pixel_mean.device
        channels_last = self.channels_last
        if channels_last is None:
            channels_last = device.type == "cpu"
        layout = torch.channels_last if channels_last else torch.contiguous_format
        batch = torch.empty(
            (len(images), 3, height, width),
            dtype=self.pixel_mean.dtype,
            device=device,
            memory_format=layout,
        ).zero_()
        for slot, image in zip(batch, images):
            image = image.to(self.pixel_mean.device)
            scale = 255.0 if image.dtype == torch.uint8 else 1.0
            h, w = image.shape[-2:]
            slot[:, :h, :w] = (image.float() / scale - self.pixel_mean) / self.pixel_std
        return batch, torch.tensor(sizes, device=batch.device)

    def pad_targets(
        self, targets: list[dict[str, Tensor]], padded_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Stack ragged targets for batched matching.

        Returns ``boxes`` [B, G, 4], ``labels`` [B, G], ``valid`` [B, G] (G = most objects
        in an image), ``masks`` [sum N, H_pad, W_pad] uint8 and ``mask_offset`` [B], the
        index of each image's first mask. Boxes-only targets (no ``masks`` key in any of
        them) give ``masks`` None: the mask branch is then not trained on the batch.
        """
        device = self.pixel_mean.device
        with_masks = ["masks" in t for t in targets]
        if any(with_masks) and not all(with_masks):
            raise ValueError(
                "a training batch mixes targets with and without 'masks'; a dataset gives "
                "masks for all its images or for none."
            )
        counts = [len(t["boxes"]) for t in targets]
        most = max(counts)
        boxes = torch.zeros((len(targets), most, 4), device=device)
        labels = torch.zeros((len(targets), most), dtype=torch.int64, device=device)
        valid = torch.zeros((len(targets), most), dtype=torch.bool, device=device)
        masks = []
        for i, (target, count) in enumerate(zip(targets, counts)):
            boxes[i, :count] = target["boxes"].to(device).reshape(-1, 4)
            labels[i, :count] = target["labels"].to(device)
            valid[i, :count] = True
            if with_masks[0]:
                mask = target["masks"].to(device, torch.uint8)
                pad = (0, padded_size[1] - mask.shape[-1], 0, padded_size[0] - mask.shape[-2])
                masks.append(F.pad(mask, pad))
        offsets = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
        return {
            "boxes": boxes,
            "labels": labels,
            "valid": valid,
            "masks": torch.cat(masks) if with_masks[0] else None,
            "mask_offset": offsets,
        }

    def postprocess(
        self, detections: dict[str, Tensor], image_sizes: Tensor, output_sizes: list[tuple]
    ) -> list[dict[str, Tensor]]:
        """Split flat detections per image, rescale to the output size and paste the masks.

        One host read for the batch: the detections per image and the input sizes."""
        image = detections["image"]
        order = torch.argsort(image, stable=True)  # each image's detections, in their order
        counts = torch.bincount(image, minlength=len(output_sizes))
        sizes = torch.cat((counts, image_sizes.flatten().to(counts))).tolist()
        counts, in_sizes = sizes[: len(output_sizes)], sizes[len(output_sizes) :]
        results = []
        for i, (index, (out_h, out_w)) in enumerate(zip(order.split(counts), output_sizes)):
            in_h, in_w = in_sizes[2 * i : 2 * i + 2]
            scale = torch.tensor([out_w / in_w, out_h / in_h] * 2, device=index.device)
            boxes = detections["boxes"][index] * scale
            results.append(
                {
                    "boxes": boxes,
                    "labels": detections["labels"][index],
                    "scores": detections["scores"][index],
                    "masks": self.paste(detections["mask_probs"][index], boxes, out_h, out_w),
                }
            )
        return results

    def paste(self, probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
        """[D, M, M] mask probabilities in their boxes [D, 4] -> [D, height, width] bool."""
        if self.mask_paste == "torchvision":
            pasted = paste_masks_in_image(probs[:, None], boxes, (height, width))[:, 0]
            return pasted > self.mask_thresh
        return paste_masks(probs, boxes, height, width, self.mask_thresh)
