"""Recipe schema and loading.

A recipe is a YAML file checked against the dataclasses below with OmegaConf, plus
``key=value`` overrides from the command line. Unknown keys and wrong types are
reported as a :class:`RecipeError` that names the key and suggests the nearest valid one;
values outside their range (the :class:`Rule` declared with a field) as one naming the key
and the value.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from trainer.saved_recipe import saved_recipe, saved_recipe_yaml


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class Rule:
    """What a valid (not null) value of a recipe key is: ``ok(value)``; ``text`` completes
    "KEY must be ..."."""

    ok: Callable[[Any], bool]
    text: str


def at_least(low: int) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def one_of(*names: str) -> Rule:
    return Rule(lambda v: v in names, f"one of {list(names)}")


POSITIVE = Rule(lambda v: v > 0, "> 0")
FRACTION = Rule(lambda v: 0 < v <= 1, "in (0, 1]")
PROBABILITY = Rule(lambda v: 0 <= v <= 1, "in [0, 1]")
SIZES = Rule(lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of numbers > 0")
# accelerate.tracking.LOGGER_TYPE_TO_CLASS's keys, spelled out: importing it takes seconds.
TRACKERS = (
    "aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb"
)  # fmt: skip
# trainer.evaluation.coco.BACKENDS, spelled out so that reading a recipe imports no evaluator.
EVALUATION_BACKENDS = ("pycocotools", "faster-coco-eval")
PHASES = ("train", "val")


def checked(default: Any, rule: Rule) -> Any:
    """A dataclass field whose value load_recipe checks with ``rule``. OmegaConf ignores
    field metadata, so :func:`_check_rules` reads the rules from the dataclasses."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass
class BackboneConfig:
    type: str = "TimmBackbone"  # a class of trainer.models.backbone.BACKBONES
    name: str = "resnet50"  # any timm model name
    pretrained: bool = True  # timm's own download of the weights
    # Local .safetensors/.pth state dict of the timm model, loaded offline instead of the
    # download.
    checkpoint: str | None = None
    # Stem plus this many stages get no gradient (and frozen BatchNorm); null: 1 with
    # weights (pretrained or checkpoint), else 0.
    frozen_stages: int | None = checked(None, at_least(0))
    # BatchNorm replaced by a frozen affine map; null: frozen with weights. false: BatchNorm
    # trains (needs a few images per process).
    frozen_bn: bool | None = None
    # Synchronize the BatchNorm that trains across processes (multi-GPU; needs frozen_bn: false).
    sync_bn: bool = False
    # timm feature indices to use; null: chosen to cover strides 4..32, with maps the model
    # lacks (e.g. a plain ViT's) made ViTDet-style from the ones it has.
    out_indices: list[int] | None = None
    # [height, width] to build the model for (timm's img_size). Models that take one input
    # size only (e.g. MaxViT) get batches padded to it: set it to the largest padded image.
    img_size: list[int] | None = checked(
        None, Rule(lambda v: len(v) == 2 and min(v) > 0, "[height, width] in pixels")
    )
    # Input normalization, RGB in [0, 1]; null: the timm model's pretrained config's.
    mean: list[float] | None = checked(None, Rule(lambda v: len(v) == 3, "3 numbers (R, G, B)"))
    std: list[float] | None = checked(
        None, Rule(lambda v: len(v) == 3 and min(v) > 0, "3 numbers > 0 (R, G, B)")
    )
    # ResNet bottlenecks downsample in their first 1x1 conv instead of the 3x3 (the MSRA /
    # Caffe2 ResNets of detectron2's model zoo).
    stride_in_1x1: bool = False


@dataclass
class RPNConfig:
    anchor_sizes: list[int] = checked([32, 64, 128, 256, 512], SIZES)  # one per pyramid level
    aspect_ratios: list[float] = checked([0.5, 1.0, 2.0], SIZES)
    fg_iou_thresh: float = checked(0.7, PROBABILITY)
    bg_iou_thresh: float = checked(0.3, PROBABILITY)
    batch_size_per_image: int = checked(256, at_least(1))
    positive_fraction: float = checked(0.5, FRACTION)
    pre_nms_top_n_train: int = checked(2000, at_least(1))  # per level
    pre_nms_top_n_test: int = checked(1000, at_least(1))  # per level
    post_nms_top_n_train: int = checked(1000, at_least(1))  # per image
    post_nms_top_n_test: int = checked(1000, at_least(1))  # per image
    nms_thresh: float = checked(0.7, PROBABILITY)


@dataclass
class RoIHeadsConfig:
    batch_size_per_image: int = checked(512, at_least(1))
    positive_fraction: float = checked(0.25, FRACTION)
    fg_iou_thresh: float = checked(0.5, PROBABILITY)
    box_coder_weights: list[float] = checked(
        [10.0, 10.0, 5.0, 5.0], Rule(lambda v: len(v) == 4 and min(v) > 0, "4 numbers > 0")
    )
    box_pool_size: int = checked(7, at_least(1))
    mask_pool_size: int = checked(14, at_least(1))
    box_fc_dim: int = checked(1024, at_least(1))
    mask_conv_dim: int = checked(256, at_least(1))
    num_mask_convs: int = checked(4, at_least(0))
    num_box_convs: int = checked(0, at_least(0))  # 3x3 convs before the box head's fc layers
    # "gn": GroupNorm in the box and mask head convs (Detectron2's GN heads)
    norm: str = checked("none", one_of("none", "gn"))
    score_thresh: float = checked(0.05, PROBABILITY)
    nms_thresh: float = checked(0.5, PROBABILITY)
    detections_per_img: int = checked(100, at_least(1))
    mask_thresh: float = checked(0.5, PROBABILITY)
    # RoIAlign of the box and mask heads: true (half-pixel offset, Detectron2) or false
    # (torchvision's MultiScaleRoIAlign); sampling points per bin side, 0: adaptive.
    pooler_aligned: bool = True
    pooler_sampling_ratio: int = checked(0, at_least(0))
    # How masks are pasted into the image: "exact" (bilinear over the exact box, Detectron2)
    # or "torchvision" (its paste_masks_in_image: box expanded by a pixel, integer corners).
    mask_paste: str = checked("exact", one_of("exact", "torchvision"))


@dataclass
class ModelConfig:
    type: str = "MaskRCNN"  # a class of trainer.models.DETECTORS
    # null: taken from the training set's categories
    num_classes: int | None = checked(None, at_least(1))
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = checked(256, at_least(1))
    # Batches are padded to a multiple of this; null: the coarsest pyramid stride (64 with
    # P6), so that every level's map is exactly the image's size over its stride.
    # torchvision pads to 32.
    size_divisibility: int | None = checked(None, at_least(1))
    # Memory format of the image batch and so of the convolutions' maps: true channels-last
    # (NHWC), false NCHW; null: channels-last on the CPU, NCHW on GPUs (where its effect is
    # not measured yet). Same detections up to float rounding; see benchmarks/README.md.
    channels_last: bool | None = None
    # Inference (eval mode) under autocast to bf16 or fp16: convolutions and matrix
    # products in that dtype; boxes, scores, RoIAlign and mask probabilities stay fp32.
    # auto: bf16 on CPUs with native bf16 (avx512_bf16, AMX; 1.6-1.7x faster than fp32 for
    # <= 0.15 AP on the demo set), fp32 on other CPUs and on GPUs. fp32: detections as
    # torchvision's for its weights. benchmarks/README.md measures both. Training precision
    # is mixed_precision's.
    inference_precision: str = checked("auto", one_of("auto", "fp32", "bf16", "fp16"))
    # Compile the backbone, FPN and RPN head for inference (torch.compile, weights frozen) in
    # trainer.predict, trainer.evaluate and Detector: 1.3-1.5x faster at 800 px on a CPU in
    # bf16, but each new image size compiles first (a minute or more on a small CPU), so for
    # long serving runs. Same detections up to float rounding; not for training.
    compile_inference: bool = False
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)


@dataclass
class DatasetConfig:
    # CocoDataset (ann_file + img_dir), ShapesDataset (the demo set) or HFDataset (path + split).
    type: str = "CocoDataset"
    ann_file: str = "???"
    img_dir: str = "???"
    # HFDataset: a Hub dataset name or a save_to_disk folder, and its split (null: "train" for
    # data.train, "validation" for data.val). `columns` renames the dataset's columns to ours
    # (image, objects, bbox, category, segmentation, image_id, width, height), e.g.
    # {objects: annotations}; boxes are xywh pixels unless bbox_format: xyxy.
    path: str | None = None
    split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    bbox_format: str = checked("xywh", one_of("xywh", "xyxy"))
    # Shortest-edge sizes; several means multi-scale (one chosen at random per image).
    min_size: list[int] = checked([800], SIZES)
    max_size: int = checked(1333, POSITIVE)
    flip_prob: float = checked(0.0, PROBABILITY)
    # Large-scale jitter (training): scale the image to fit lsj_size x lsj_size times a random
    # factor in lsj_scale, then crop or pad to that square; replaces min_size/max_size. null: off.
    lsj_size: int | None = checked(None, POSITIVE)
    lsj_scale: list[float] = checked(
        [0.1, 2.0],
        Rule(
            lambda v: len(v) == 2 and 0 < v[0] <= v[1],
            "[low, high] with 0 < low <= high, e.g. [0.1, 2.0]",
        ),
    )
    # Photometric jitter (training): brightness, contrast and saturation each scaled by a random
    # factor in [1 - color_jitter, 1 + color_jitter]. 0: off.
    color_jitter: float = checked(0.0, at_least(0))
    # Leave out images with no usable annotation (training only).
    filter_empty: bool = False
    # Read every image file's header before training (missing, unreadable, size disagreeing
    # with the annotations): about 60 us per image, seconds for COCO's 118k.
    check_images: bool = True
    # Defaults to data.on_bad_annotation.
    on_bad_annotation: str = checked("${..on_bad_annotation}", one_of("error", "skip"))


@dataclass
class DataConfig:
    # Images per process in each training step: the per-process batch size (what torch's
    # DataLoader calls batch_size). The global batch is this x processes x accumulation_steps.
    imgs_per_gpu: int = checked(2, at_least(1))
    workers_per_gpu: int = checked(2, at_least(0))  # loader worker processes per process
    # Training batches hold images of one orientation (landscape or portrait): less padding.
    group_by_aspect_ratio: bool = True
    # Bad annotations found before training: "error" stops the run listing them, "skip" leaves
    # them (and unusable images) out and logs how many.
    on_bad_annotation: str = checked("error", one_of("error", "skip"))
    train: DatasetConfig = field(
        default_factory=lambda: DatasetConfig(flip_prob=0.5, filter_empty=True)
    )
    val: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class OptimizerConfig:
    type: str = "SGD"  # SGD, AdamW or another class of trainer.engine.optim.OPTIMIZERS
    # At `base_batch_size` images per update; scaled linearly to the real global batch
    # (processes x data.imgs_per_gpu x accumulation_steps).
    lr: float = checked(0.02, POSITIVE)
    base_batch_size: int = checked(16, at_least(1))
    momentum: float = checked(0.9, PROBABILITY)  # SGD
    betas: list[float] = checked(  # AdamW
        [0.9, 0.999],
        Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    )
    weight_decay: float = checked(1e-4, at_least(0))
    # Weight decay also on normalization weights and biases (off: the usual practice).
    decay_norm_and_bias: bool = False
    backbone_lr_mult: float = checked(1.0, at_least(0))  # the backbone's lr is lr x this
    # max L2 norm of all gradients; null: no clipping
    grad_clip: float | None = checked(None, POSITIVE)
    # Batches whose gradients are summed before each update (a larger effective batch).
    accumulation_steps: int = checked(1, at_least(1))


@dataclass
class LRScheduleConfig:
    policy: str = "step"  # step (x gamma at each of `steps`) or cosine (to min_lr_ratio x lr)
    warmup_iters: int = checked(500, at_least(0))  # linear warmup, in updates
    warmup_ratio: float = checked(0.001, PROBABILITY)  # lr factor at the first update
    # epochs where lr *= gamma
    steps: list[int] = checked([8, 11], Rule(lambda v: all(s >= 0 for s in v), "epochs >= 0"))
    gamma: float = checked(0.1, POSITIVE)
    min_lr_ratio: float = checked(0.0, PROBABILITY)  # cosine: final lr as a fraction of the peak


@dataclass
class CheckpointConfig:
    # An Accelerate state is saved after every training epoch, and every `interval_iters`
    # updates when set (resume points inside long epochs).
    interval_iters: int | None = checked(None, at_least(1))
    # periodic checkpoints kept (the best one is exported apart); 0: keep all
    keep_last: int = checked(3, at_least(0))


@dataclass
class EMAConfig:
    enabled: bool = False  # keep an exponential moving average of the weights, used for val
    decay: float = checked(0.9998, Rule(lambda v: 0 < v < 1, "in (0, 1)"))
    warmup: bool = True  # decay ramps up over the first updates (timm ModelEmaV3)


@dataclass
class EvaluationConfig:
    # COCOeval implementation for val phases and trainer.evaluate: "pycocotools", or
    # "faster-coco-eval" (the same metrics in about a third of the time; its own package).
    backend: str = checked("pycocotools", one_of(*EVALUATION_BACKENDS))


@dataclass
class DDPConfig:
    # DDP searches each step for parameters that got no gradient. Frozen parameters are not
    # in DDP at all and every trainable one of the detector gets a gradient every step (also
    # without objects or masks), so this is for added parts that sit out some steps; it
    # costs a graph traversal per step.
    find_unused_parameters: bool = False


@dataclass
class Recipe:
    work_dir: str | None = None  # null: work_dirs/<recipe file name>
    seed: int = 42
    total_epochs: int = checked(12, at_least(1))
    # (phase, epochs) pairs repeated until total_epochs training epochs are done.
    workflow: list[Any] = field(default_factory=lambda: [["train", 1]])
    resume: str | None = None  # "auto" (latest checkpoint in work_dir) or a checkpoint path
    # Start from trained detector weights (fine-tuning; unlike resume, a new run): a work_dir,
    # checkpoint folder or weights file of this project, a torchvision / detectron2 /
    # mmdetection Mask R-CNN checkpoint, an http(s) URL or a Hugging Face Hub repo id.
    # Class-specific rows are matched by class name. Ignored when resuming.
    load_from: str | None = None
    # stop training after this many iterations (smoke runs)
    max_iters: int | None = checked(None, at_least(1))
    # updates between train log lines (losses averaged over them)
    log_interval: int = checked(20, at_least(1))
    # Also run the val phase every this many updates, inside epochs; null: workflow only.
    val_interval_iters: int | None = checked(None, at_least(1))
    # Consecutive updates with a non-finite loss (each skipped) before the run stops.
    max_nonfinite_steps: int = checked(5, at_least(1))
    # null: from the accelerate config; or no/fp16/bf16
    mixed_precision: str | None = checked(
        None, Rule(lambda v: v in ("no", "fp16", "bf16"), "null, no, fp16 or bf16")
    )
    # torch.compile the backbone and FPN for training (dynamic shapes; the first steps of
    # each new image size are slow while it compiles). See benchmarks/README.md for its effect.
    compile: bool = False
    ddp: DDPConfig = field(default_factory=DDPConfig)
    # Seconds a process waits for the others at a collective (gradient sync, checkpoint)
    # before it stops with an error: a process that stalls or dies then ends the run (and,
    # under `accelerate launch --max_restarts N`, restarts it) instead of hanging it.
    dist_timeout: int = checked(1800, at_least(1))
    # accelerate trackers: wandb, tensorboard, ...
    trackers: list[str] = checked(
        [], Rule(lambda v: set(v) <= set(TRACKERS), f"a list of names among {list(TRACKERS)}")
    )
    project: str = "trainer"  # tracker project name
    # val images with predictions drawn, sent to trackers per val phase
    log_images: int = checked(4, at_least(0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)


PHASES = ("train", "val")
# trainer.evaluation.coco.BACKENDS, spelled out so that reading a recipe imports no evaluator.
EVALUATION_BACKENDS = ("pycocotools", "faster-coco-eval")


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    """All dotted key paths of a schema node, for suggestions."""
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            keys.extend(_valid_keys(node._get_node(key), path + "."))
    return keys


def _explain(exc: OmegaConfBaseException, schema: DictConfig, source: str) -> RecipeError:
    """Turn an OmegaConf error into one readable message with a suggestion."""
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc):
        candidates = _valid_keys(schema)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        siblings = [c for c in candidates if c.startswith(parent) and "." not in c[len(parent) :]]
        close = difflib.get_close_matches(key, siblings or candidates, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return RecipeError(f"{source}: unknown recipe key '{key}'.{hint}")
    if isinstance(exc, ValidationError):
        return RecipeError(f"{source}: wrong type for key '{key}': {exc.msg.splitlines()[0]}.")
    message = exc.msg.splitlines()[0] if exc.msg else str(exc)
    if isinstance(exc, InterpolationResolutionError):
        # e.g. "project: environment variable 'WANDB_ENTITY' is not set"
        message = message.replace("KeyError raised while resolving interpolation: ", "")
        message = re.sub(
            r'"?Environment variable (\S+) not found"?',
            r"environment variable \1 is not set",
            message,
        )
        return RecipeError(f"{source}: {key or 'a value'}: {message}.")
    return RecipeError(f"{source}: {message}")


def _check_rules(node: DictConfig, source: str) -> None:
    """Check every set, non-null value of ``node`` (a schema dataclass) and the sections in
    it against the :class:`Rule` declared with its field."""
    for spec in fields(OmegaConf.get_type(node)):
        if OmegaConf.is_missing(node, spec.name):  # "must be set" is checked before
            continue
        value = node[spec.name]
        if isinstance(value, DictConfig) and is_dataclass(OmegaConf.get_type(value)):
            _check_rules(value, source)
            continue
        rule = spec.metadata.get("rule")
        if rule is not None and value is not None and not rule.ok(value):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            raise RecipeError(
                f"{source}: {node._get_full_key(spec.name)} must be {rule.text}, got {shown!r}."
            )


def _check_values(cfg: DictConfig, source: str) -> None:
    """Checks that involve more than one value, or the file system."""
    workflow = OmegaConf.to_container(cfg.workflow)
    for step in workflow:
        if (
            not isinstance(step, list | tuple)
            or len(step) != 2
            or step[0] not in PHASES
            or not isinstance(step[1], int)
            or step[1] < 1
        ):
            raise RecipeError(
                f"{source}: workflow entry {step!r} must be [phase, epochs] with phase in "
                f"{list(PHASES)} and epochs a positive integer, e.g. [[train, 1], [val, 1]]."
            )
    if not any(step[0] == "train" for step in workflow):
        raise RecipeError(f"{source}: workflow {workflow} has no train phase.")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        raise RecipeError(f"{source}: resume checkpoint '{cfg.resume}' does not exist.")
    for split in ("train", "val"):
        node = cfg.data[split]
        if node.type == "HFDataset":  # reads data.<split>.path instead
            if not node.path:
                raise RecipeError(
                    f"{source}: data.{split}.path must name the Hugging Face dataset: a Hub "
                    "name or a folder written by save_to_disk."
                )
            continue
        for key in ("ann_file", "img_dir"):
            if OmegaConf.is_missing(node, key):
                raise RecipeError(f"{source}: data.{split}.{key} must be set.")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Load a YAML recipe, apply ``key=value`` overrides and validate it.

    Returns a read-only DictConfig with every key of :class:`Recipe`; ``work_dir``
    defaults to ``work_dirs/<recipe file stem>``. Raises RecipeError on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist.")
    schema = OmegaConf.structured(Recipe)
    try:
        user = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry the line and column
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(user, DictConfig) or not user:
        holds = "nothing" if not user else "a list"
        raise RecipeError(
            f"{path}: a recipe is a mapping of keys (e.g. 'model:', 'data:', 'optimizer:'), "
            f"but the file holds {holds}; see recipes/mask_rcnn.yaml."
        )
    source = str(path)
    try:
        cfg = OmegaConf.merge(schema, user)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, source) from None
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(
                f"override '{item}' must look like key=value, e.g. optimizer.lr=0.01."
            )
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, f"override '{item}'") from None
    if cfg.work_dir is None:
        cfg.work_dir = str(Path("work_dirs") / path.stem)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    if cfg.mixed_precision in ("False", "false"):
        cfg.mixed_precision = "no"  # YAML reads a bare `no` as false, as in `mixed_precision=no`
    _check_values(cfg, source)
    try:
        _check_rules(cfg, source)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        raise _explain(exc, schema, source) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_recipe(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved recipe as YAML (work_dir/config.yaml); values taken from the
    environment keep their ``${oc.env:...}`` text (see trainer/saved_recipe.py)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(saved_recipe_yaml(cfg))


def to_dict(cfg: DictConfig | ListConfig) -> Any:
    """Plain Python containers, e.g. for trackers: resolved, except values taken from the
    environment (see trainer/saved_recipe.py)."""
    return saved_recipe(cfg)
