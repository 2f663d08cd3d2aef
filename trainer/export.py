"""Export a trained detector to ONNX, and run an export from ``trainer.predict`` / ``Detector``.

    python -m trainer.export [RECIPE] --checkpoint PATH --out DIR [--format onnx]
        [key=value ...]

PATH is what ``trainer.predict`` takes (a work_dir, a checkpoint folder or a weights file);
RECIPE is needed only for weights that carry none. Writes into DIR:

- ``model.onnx``: one resized image, uint8 RGB [3, H, W] of any size, in; its detections
  out: ``boxes`` [D, 4] xyxy in the input's pixels, ``scores`` [D], ``labels`` [D] (1..K)
  and ``mask_probs`` [D, M, M], each box's mask probabilities. Normalization, padding, the
  backbone, both stages and their NMS are in the graph. Its metadata holds the recipe, the
  classes and the preprocessing, so the file alone is enough.
- ``preprocessing.json``: the resize rule (``min_size``, ``max_size``), ``mean``/``std``
  (applied in the graph), the mask threshold and paste, the opset.
- ``classes.json`` and ``config.yaml``, as checkpoint folders have.

Resizing the image before the graph and pasting the masks at the image's size after it are
in ``trainer/onnx_model.py`` (numpy and onnxruntime only; no torch). ``trainer.predict``
and ``Detector.from_pretrained`` take ``model.onnx`` or DIR as the checkpoint and run it
with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import nms, roi_align

from trainer.cli import run_main
from trainer.models.roi_heads import MIN_DETECTION_SIZE
from trainer.models.rpn import MIN_PROPOSAL_SIZE
from trainer.ops.poolers import assign_levels

OPSET = 18
ONNX_FILE = "model.onnx"
PREPROCESSING_FILE = "preprocessing.json"
# Drops a box from ONNX's NonMaxSuppression: scores must exceed its score_threshold, and
# -inf exceeds nothing.
DROPPED = float("-inf")
LOWEST = torch.finfo(torch.float32).min


@torch.library.custom_op("trainer::nms_per_class", mutates_args=())
def nms_per_class(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float
) -> Tensor:
    """ONNX's NonMaxSuppression: boxes [B, N, 4], scores [B, C, N] -> [S, 3] int64 rows
    (batch, class, box) of the boxes kept, by batch, then class, then falling score.

    NMS runs apart for every (batch, class) over the boxes scoring above
    ``score_threshold``: one graph node for what ``batched_nms`` does per group.
    """
    rows = []
    for b in range(boxes.shape[0]):
        for c in range(scores.shape[1]):
            candidates = torch.nonzero(scores[b, c] > score_threshold).squeeze(1)
            kept = candidates[nms(boxes[b, candidates], scores[b, c, candidates], iou_threshold)]
            rows.append(torch.stack((torch.full_like(kept, b), torch.full_like(kept, c), kept), 1))
    return torch.cat(rows) if rows else boxes.new_zeros((0, 3), dtype=torch.int64)


@nms_per_class.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def _nms_per_class_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
    from onnxscript import opset18 as op

    most = op.Constant(value_ints=[2**63 - 1])
    iou = op.Constant(value_floats=[iou_threshold])
    score = op.Constant(value_floats=[score_threshold])
    return op.NonMaxSuppression(boxes, scores, most, iou, score)


class ExportableMaskRCNN(nn.Module):
    """A MaskRCNN's inference for one image, written with no host reads so that it exports
    to one graph: the model's own modules, the same arithmetic.

    forward(image uint8 [3, H, W]) -> boxes [D, 4] (in the image's pixels), scores [D],
    labels [D] int64 in 1..K, mask_probs [D, M, M]; best first.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        check_exportable(model)
        self.model = model
        rpn = model.rpn
        self.register_buffer("mean", model.pixel_mean.clone(), persistent=False)
        self.register_buffer("std", model.pixel_std.clone(), persistent=False)
        for level, cell in enumerate(rpn.anchor_generator.cell_anchors):
            self.register_buffer(f"cell_anchors_{level}", cell.clone(), persistent=False)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        height, width = image.shape[-2:]
        pyramid = model.fpn(model.backbone(self.preprocess(image)))
        one = torch.ones_like(self.mean[0, 0, 0])
        limits = torch.stack((one * width, one * height)).repeat(2)  # clip to (w, h, w, h)
        proposals = self.proposals(pyramid, limits)
        return self.detections(pyramid[:-1], proposals, limits)

    def preprocess(self, image: Tensor) -> Tensor:
        """uint8 [3, H, W] -> normalized [1, 3, H_pad, W_pad], as MaskRCNN.preprocess."""
        model = self.model
        height, width = image.shape[-2:]
        normalized = (image.float() / 255.0 - self.mean) / self.std
        if model.backbone.fixed_size is not None:
            fixed_h, fixed_w = model.backbone.fixed_size
            pad_h, pad_w = fixed_h - height, fixed_w - width
        else:
            divisor = model.size_divisibility
            pad_h, pad_w = (-height) % divisor, (-width) % divisor
        return nn.functional.pad(normalized, (0, pad_w, 0, pad_h))[None]

    def anchors(self, level: int, feature: Tensor, stride: int) -> Tensor:
        """[H_l * W_l * A, 4], as AnchorGenerator."""
        height, width = feature.shape[-2:]
        xs = torch.arange(width, dtype=torch.float32, device=feature.device) * stride
        ys = torch.arange(height, dtype=torch.float32, device=feature.device) * stride
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((x, y, x, y), dim=-1).reshape(-1, 1, 4)
        return (shifts + getattr(self, f"cell_anchors_{level}")[None]).reshape(-1, 4)

    def proposals(self, pyramid: list[Tensor], limits: Tensor) -> Tensor:
        """RegionProposalNetwork.select_proposals for one image -> [P, 4], best first."""
        rpn = self.model.rpn
        logits, deltas = rpn.head(pyramid)
        boxes, scores, levels = [], [], []
        for level, (feature, level_logits, level_deltas) in enumerate(zip(pyramid, logits, deltas)):
            anchors = self.anchors(level, feature, rpn.strides[level])
            k = torch.sym_min(rpn.pre_nms_top_n["test"], level_logits.shape[1])
            top_scores, top_index = level_logits[0].topk(k)
            boxes.append(rpn.box_coder.decode(level_deltas[0, top_index], anchors[top_index]))
            scores.append(top_scores.float())
            levels.append(torch.full_like(top_index, level))
        boxes = _clip(torch.cat(boxes), limits)
        scores, levels = torch.cat(scores), torch.cat(levels)
        scores = torch.where(_small(boxes, MIN_PROPOSAL_SIZE), DROPPED, scores)
        per_level = torch.stack(
            [torch.where(levels == level, scores, DROPPED) for level in range(len(pyramid))]
        )
        kept = nms_per_class(boxes[None], per_level[None], rpn.nms_thresh, LOWEST)[:, 2]
        order = torch.sort(scores[kept], descending=True).indices
        return boxes[kept[order]][: rpn.post_nms_top_n["test"]]

    def pool(self, pooler, features: list[Tensor], boxes: Tensor) -> Tensor:
        """MultiLevelRoIAlign for one image -> [R, C, S, S]."""
        rois = torch.cat((torch.zeros_like(boxes[:, :1]), boxes), dim=1)
        size = pooler.output_size
        if len(features) == 1:
            return roi_align(
                features[0], rois, size, pooler.scales[0], pooler.sampling_ratio, pooler.aligned
            )
        levels = assign_levels(boxes, pooler.min_level, pooler.max_level)
        pooled = features[0].new_zeros((boxes.shape[0], features[0].shape[1], size, size))
        for level, (feature, scale) in enumerate(zip(features, pooler.scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            level_pooled = roi_align(
                feature, rois[index], size, scale, pooler.sampling_ratio, pooler.aligned
            )
            pooled = pooled.index_put((index,), level_pooled)
        return pooled

    def detections(
        self, features: list[Tensor], proposals: Tensor, limits: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """RoIHeads.predict for one image."""
        heads = self.model.roi_heads
        pooled = self.pool(heads.box_pooler, features, proposals)
        index = torch.arange(proposals.shape[0], device=proposals.device)
        class_logits, deltas = heads._box_head(pooled, index)
        scores = torch.softmax(class_logits.float(), dim=1)[:, 1:]  # [R, K]
        decoded = _clip(heads.box_coder.decode(deltas[:, 1:], proposals[:, None, :]), limits)
        masked = torch.where(_small(decoded, MIN_DETECTION_SIZE), DROPPED, scores)
        # Classes as NMS batches: each class's boxes are its own.
        chosen = nms_per_class(
            decoded.transpose(0, 1), masked.t()[:, None, :], heads.nms_thresh, heads.score_thresh
        )
        label, row = chosen[:, 0], chosen[:, 2]
        det_scores = scores[row, label]
        order = torch.sort(det_scores, descending=True).indices[: heads.detections_per_img]
        label, row = label[order], row[order]
        boxes = decoded[row, label]
        labels = label + 1
        mask_pooled = self.pool(heads.mask_pooler, features, boxes)
        mask_probs = torch.sigmoid(heads.mask_head(mask_pooled, labels).float())
        return boxes, det_scores[order], labels, mask_probs


def check_exportable(model: nn.Module) -> None:
    """A RecipeError (a ValueError) unless ``model`` infers as MaskRCNN does, the inference
    written here: the recipe's ``model.type`` chose a detector that changes it."""
    from trainer.config import RecipeError
    from trainer.models.mask_rcnn import MaskRCNN
    from trainer.models.roi_heads import RoIHeads
    from trainer.models.rpn import RegionProposalNetwork

    same = (
        isinstance(model, MaskRCNN)
        and type(model).forward is MaskRCNN.forward
        and type(model).postprocess is MaskRCNN.postprocess
        and type(model.rpn).select_proposals is RegionProposalNetwork.select_proposals
        and type(model.roi_heads).predict is RoIHeads.predict
        and type(model.roi_heads).detect is RoIHeads.detect
    )
    if not same:
        raise RecipeError(
            f"model.type: ONNX export covers MaskRCNN's own inference, and "
            f"{type(model).__name__} (or its RPN / RoI heads) changes it; extend "
            "trainer/export.py's ExportableMaskRCNN to export it."
        )


def _clip(boxes: Tensor, limits: Tensor) -> Tensor:
    """xyxy boxes [..., 4] clipped to [0, width] x [0, height]; limits (w, h, w, h)."""
    return torch.minimum(boxes.clamp(min=0), limits)


def _small(boxes: Tensor, min_size: float) -> Tensor:
    """Boxes narrower or shorter than ``min_size`` (torchvision's remove_small_boxes)."""
    wide = (boxes[..., 2] - boxes[..., 0]) >= min_size
    return ~(wide & ((boxes[..., 3] - boxes[..., 1]) >= min_size))


def preprocessing_of(model: nn.Module, cfg) -> dict[str, Any]:
    """What the graph expects and what its outputs need, for preprocessing.json and the
    model's metadata."""
    return {
        "input": "uint8 RGB [3, H, W], resized by min_size / max_size; mean and std are "
        "applied in the graph",
        "min_size": [int(size) for size in cfg.data.val.min_size],
        "max_size": int(cfg.data.val.max_size),
        "mean": list(model.backbone.mean),
        "std": list(model.backbone.std),
        "size_divisibility": int(model.size_divisibility),
        "fixed_size": list(model.backbone.fixed_size) if model.backbone.fixed_size else None,
        "mask_threshold": float(model.mask_thresh),
        "mask_paste": model.mask_paste,
        "opset": OPSET,
    }


def _require_exporter() -> None:
    from trainer.onnx_model import MissingDependencyError

    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"exporting to ONNX needs {' and '.join(missing)}, not installed: "
            "pip install onnx onnxscript onnxruntime  (or: pip install 'trainer[export]')"
        )


def export_onnx(model: nn.Module, cfg, classes, out: str | Path) -> Path:
    """Write ``out/model.onnx`` (metadata: recipe, classes, preprocessing),
    ``preprocessing.json``, ``classes.json`` and ``config.yaml``; returns the model's path.

    The graph is exported by torch.export (the dynamo exporter): its symbolic shapes keep
    the image size, the top-k counts and the NMS outputs dynamic without tracing-only code.
    """
    from trainer.saved_recipe import saved_recipe_yaml

    _require_exporter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableMaskRCNN(model.cpu().eval()).eval()
    # A landscape image of the recipe's size; any size of at least 2 x 2 runs the graph.
    min_size, max_size = max(cfg.data.val.min_size), cfg.data.val.max_size
    example = torch.zeros((3, min_size, min(max_size, min_size * 4 // 3)), dtype=torch.uint8)
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["image"],
        output_names=["boxes", "scores", "labels", "mask_probs"],
        dynamic_shapes={"image": {1: dynamic, 2: dynamic}},
        custom_translation_table={torch.ops.trainer.nms_per_class.default: _nms_per_class_onnx},
        verbose=False,
    )
    preprocessing = preprocessing_of(model, cfg)
    recipe_yaml = saved_recipe_yaml(cfg)  # no value read from the environment written down
    program.model.metadata_props.update(
        {
            "preprocessing": json.dumps(preprocessing),
            "classes": classes.to_json(),
            "recipe": recipe_yaml,
        }
    )
    path = out / ONNX_FILE
    program.save(path, external_data=False)
    (out / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=1))
    (out / "config.yaml").write_text(recipe_yaml)
    classes.save(out)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from trainer.predict import split_recipe_argument

    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description="Export a trained detector to ONNX: model.onnx, preprocessing.json, "
        "classes.json and config.yaml.",
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        help="the recipe the checkpoint was trained with (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="work_dir, checkpoint folder or weights file"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="(default: onnx)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)
    split_recipe_argument(args)
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the command; returns the path of model.onnx."""
    args = parse_args(argv)
    from trainer.weights.pretrained import build_pretrained, pretrained_classes, pretrained_recipe
    from trainer.weights.read import read_weights

    _require_exporter()
    weights = read_weights(args.checkpoint)
    cfg = pretrained_recipe(weights, args.recipe, args.overrides)
    classes = pretrained_classes(weights, cfg)
    model = build_pretrained(weights, cfg, classes, compile_inference=False)
    path = export_onnx(model, cfg, classes, args.out)
    print(f"wrote {path} (opset {OPSET}), {PREPROCESSING_FILE}, classes.json, config.yaml")
    return path


# Running an export from trainer.predict and Detector.


def onnx_export(source: str | Path) -> Path | None:
    """The ONNX model ``source`` names: a ``.onnx`` file, or a folder holding ``model.onnx``
    and no PyTorch weights; None for anything else."""
    path = Path(source)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / ONNX_FILE).is_file() and not (path / "model.safetensors").exists():
        return path / ONNX_FILE
    return None


class OnnxModule:
    """An ONNX export called like the PyTorch detector in eval mode:
    ``model(images, output_sizes)`` -> per image ``boxes``, ``labels``, ``scores``,
    ``masks`` (torch tensors on the CPU). The graph runs one image at a time."""

    training = False

    def __init__(self, runtime):
        self.runtime = runtime

    def eval(self) -> OnnxModule:
        return self

    def to(self, device) -> OnnxModule:
        return self

    def __call__(
        self, images: list[Tensor], output_sizes: list[tuple[int, int]] | None = None
    ) -> list[dict[str, Tensor]]:
        if output_sizes is None:
            output_sizes = [tuple(image.shape[-2:]) for image in images]
        results = []
        for image, size in zip(images, output_sizes, strict=True):
            if image.is_floating_point():
                image = (image.clamp(0, 1) * 255).round()
            array = image.to(torch.uint8).cpu().numpy()
            raw = self.runtime.run(array)
            output = self.runtime.postprocess(raw, array.shape[1:], tuple(size))
            results.append({key: torch.from_numpy(value) for key, value in output.items()})
        return results


def load_onnx(
    path: Path,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    classes: list[str] | None = None,
    device: str | torch.device | None = None,
):
    """An ONNX export -> (OnnxModule, recipe, ModelClasses); the recipe and classes are the
    export's own unless given."""
    import tempfile

    from trainer.config import load_recipe
    from trainer.onnx_model import OnnxMaskRCNN, import_onnxruntime
    from trainer.weights.classes import ModelClasses

    providers = ["CPUExecutionProvider"]
    if device is not None and torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" in import_onnxruntime().get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
    runtime = OnnxMaskRCNN(path, providers=providers)
    if recipe is not None:
        cfg = load_recipe(recipe, overrides)
    else:
        with tempfile.TemporaryDirectory() as folder:
            recipe_file = Path(folder) / "config.yaml"
            recipe_file.write_text(runtime.recipe or "")
            cfg = load_recipe(recipe_file, overrides)
    if classes is not None:
        model_classes = ModelClasses(list(classes))
    else:
        model_classes = ModelClasses.from_json(json.dumps(runtime.classes), str(path))
    return OnnxModule(runtime), cfg, model_classes


def cli() -> None:
    from trainer.onnx_model import MissingDependencyError

    run_main(main, errors=(MissingDependencyError,))


if __name__ == "__main__":
    cli()
