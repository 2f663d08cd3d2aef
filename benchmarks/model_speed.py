"""Our Mask R-CNN against torchvision's, same backbone family and head sizes, same inputs.

Both models are built in one process and run alternately (ours first on even rounds,
torchvision's first on odd ones), so drift in machine load hits both. Reported, as medians
and as ratios ours / torchvision (below 1 is better):
- a training step (forward, backward, SGD step): wall time, and CPU time of the process,
  which counts the work done and is steadier on a machine that runs other jobs;
- inference per image with about 100 detections per image (so mask pasting counts);
- peak memory of each: the largest rise of allocated tensor bytes during the call, from
  torch.profiler's allocation events;
- then inference alone over image sizes and batch sizes (``--sweep-sizes``,
  ``--sweep-batches``), each configuration timed the same interleaved way.

Our model runs in one or more variants of its inference options (``--variants``: precision,
memory format, compiled; ``default`` is the recipe's defaults), torchvision's in its
defaults (fp32, NCHW, eager); all of them alternate in the sweep. When ``fp32`` is among
them, every other variant has its detections compared with fp32's, same weights, same
images (matched detections, box, score and mask differences); ``--agreement-weights`` does
the same on trained weights and real images.

    python benchmarks/model_speed.py --variants default fp32   # what `make bench` runs
    python benchmarks/model_speed.py --backbone resnet18 --height 320 --width 480
    python benchmarks/model_speed.py --skip-main --variants fp32 bf16 fp32+compile bf16+compile

Goals on a 2-core CPU: train step <= 0.8x torchvision's time, inference <= 0.5x, peak
memory <= 1.0x.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import box_iou

from trainer.config import ModelConfig
from trainer.models import build_detector

# Inference options of our model, joined by "+" into a variant ("bf16+compile"):
# model.inference_precision, model.channels_last, trainer.models.compile_for_inference.
OPTIONS = ("default", "fp32", "bf16", "fp16", "nchw", "nhwc", "compile")
# The variant every other one's detections are compared with.
REFERENCE = "fp32"


def parse_variant(variant: str) -> set[str]:
    options = set(variant.split("+")) - {"default"}
    unknown = options - set(OPTIONS)
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)} in '{variant}': {OPTIONS}")
    return options


def build_ours(backbone: str, num_classes: int, variant: str = "default") -> torch.nn.Module:
    """Our detector with the inference options of ``variant`` (compiled at its first call)."""
    options = parse_variant(variant)
    cfg = OmegaConf.structured(ModelConfig)
    cfg.backbone.name = backbone
    cfg.backbone.pretrained = False
    # torchvision's defaults for a detection ResNet: frozen BN, stem and layer1 frozen.
    cfg.backbone.frozen_stages = 1
    cfg.backbone.frozen_bn = True
    # Keys set only when not the default, so that the script also measures older versions.
    for precision in {"fp32", "bf16", "fp16"} & options:
        cfg.inference_precision = precision
    if options & {"nchw", "nhwc"}:
        cfg.channels_last = "nhwc" in options
    return build_detector(cfg, num_classes=num_classes)


def compile_variant(model: torch.nn.Module, variant: str) -> None:
    if "compile" in parse_variant(variant):
        from trainer.models import compile_for_inference

        compile_for_inference(model)


def build_torchvision(backbone: str, num_classes: int, height: int, width: int):
    """torchvision's Mask R-CNN with our defaults where its own differ (post-NMS top-k in
    training), and no resizing: min/max size equal to the input size."""
    return TorchvisionMaskRCNN(
        resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=3),
        num_classes=num_classes + 1,
        min_size=min(height, width),
        max_size=max(height, width),
        rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=1000,
        rpn_post_nms_top_n_test=1000,
        box_batch_size_per_image=512,
        box_detections_per_img=100,
    )


def favour_classes(classifier: torch.nn.Linear, count: int) -> None:
    """Give ``count`` foreground classes a logit of +4 over the rest.

    With random weights every class scores about 1 / (K + 1), under the 0.05 threshold, so
    nothing would be detected; a trained model instead gives a few classes most of the
    probability. With this bias about ``count`` x 1000 boxes per image pass the threshold,
    NMS runs on them per class and about 100 detections per image remain.
    """
    with torch.no_grad():
        classifier.bias.zero_()
        classifier.bias[1 : count + 1] = 4.0


def make_batch(batch: int, height: int, width: int, objects: int, num_classes: int, seed: int):
    """Images in [0, 1] and targets with ellipse masks inside random boxes."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g))
        size = torch.rand(objects, 2, generator=g) * torch.tensor([width, height]) * 0.4 + 16
        corner = torch.rand(objects, 2, generator=g) * (torch.tensor([width, height]) - size)
        boxes = torch.cat((corner, corner + size), dim=1).round()
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
        inside = ((xs - cx[:, None, None]) / rx[:, None, None]) ** 2 + (
            (ys - cy[:, None, None]) / ry[:, None, None]
        ) ** 2
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.randint(1, num_classes + 1, (objects,), generator=g),
                "masks": (inside <= 1).to(torch.uint8),
            }
        )
    return images, targets


def train_step(model, optimizer, images, targets) -> None:
    model.train()
    losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


def amp_train_step(model, optimizer, scaler, dtype, images, targets) -> None:
    """A training step under autocast to ``dtype`` (None: fp32), with ``scaler`` (a
    GradScaler, enabled for fp16) as a mixed-precision training loop does."""
    with torch.autocast(images[0].device.type, dtype=dtype, enabled=dtype is not None):
        losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(sum(losses.values())).backward()
    scaler.step(optimizer)
    scaler.update()


# Gradient mode of inference calls: torch.no_grad(), or torch.inference_mode() with
# --inference-mode (both models).
GRAD_MODE = {"context": torch.no_grad}


def inference(model, images) -> list[dict[str, torch.Tensor]]:
    model.eval()
    with GRAD_MODE["context"]():
        return model(images)


def count(outputs) -> int:
    return sum(len(output["boxes"]) for output in outputs)


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result). CPU time counts the work done
    whatever else the machine runs; wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def peak_memory(fn, *args) -> int:
    """Largest rise of allocated tensor bytes during the call."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", help="resnet18/34/50/101")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=8, help="objects per training image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--skip-main", action="store_true", help="no train step / memory table, the sweep only"
    )
    parser.add_argument(
        "--sweep-sizes",
        nargs="*",
        default=["384x512", "800x1088"],
        metavar="HxW",
        help="image sizes of the inference sweep (none: no sweep)",
    )
    parser.add_argument("--sweep-batches", nargs="*", type=int, default=[1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        help="our model's inference options, each a '+'-joined set of "
        f"{', '.join(OPTIONS)}: e.g. default fp32 fp32+compile bf16+compile (default: the "
        "recipe's defaults, model.inference_precision auto). The first is the main table's; "
        "the sweep times all of them",
    )
    parser.add_argument(
        "--agreement-weights",
        help="also compare each variant's detections with the default's on trained weights "
        "(any format trainer.Detector reads, e.g. torchvision's COCO Mask R-CNN .pth) and "
        "--agreement-images, each resized as the recipe's val set",
    )
    parser.add_argument(
        "--agreement-recipe",
        default="recipes/mask_rcnn_torchvision.yaml",
        help="recipe of --agreement-weights when they carry none",
    )
    parser.add_argument("--agreement-images", nargs="*", default=[], metavar="FILE")
    parser.add_argument(
        "--inference-mode",
        action="store_true",
        help="all models: inference under torch.inference_mode() instead of torch.no_grad()",
    )
    args = parser.parse_args()
    for variant in args.variants:
        parse_variant(variant)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inference_mode:
        GRAD_MODE["context"] = torch.inference_mode
    torch.manual_seed(0)
    ours = {f"ours {v}": build_ours(args.backbone, args.classes, v) for v in args.variants}
    torchvision_model = build_torchvision(args.backbone, args.classes, args.height, args.width)
    first = next(iter(ours.values()))
    favour_classes(first.roi_heads.box_head.cls_score, 4)
    favour_classes(torchvision_model.roi_heads.box_predictor.cls_score, 4)
    for model in ours.values():  # the same weights in every variant
        model.load_state_dict(first.state_dict())
    print(header(args))
    if not args.skip_main:
        # A compiled model's weights are constants: the train steps run on an eager copy.
        trained = copy.deepcopy(first)
        compile_variant(first, args.variants[0])
        main_table(
            args,
            {"ours": first, "torchvision": torchvision_model},
            {"ours": trained, "torchvision": torchvision_model},
        )
        for model in ours.values():  # the train steps moved the weights
            model.load_state_dict(trained.state_dict())
    for model, variant in zip(ours.values(), args.variants):
        if args.skip_main or model is not first:
            compile_variant(model, variant)
    if args.sweep_sizes and args.sweep_batches:
        print()
        agreement = sweep(args, ours, torchvision_model)
        if REFERENCE in args.variants and len(args.variants) > 1:
            print()
            report_agreement(agreement, "random weights, the sweep's images")
    if args.agreement_weights:
        print()
        report_agreement(trained_agreement(args), f"{args.agreement_weights}, own images")


def header(args) -> str:
    return (
        f"# {args.backbone}-FPN, {args.classes} classes; ours: {', '.join(args.variants)}"
        + (", inference_mode" if args.inference_mode else "")
        + f"; median of {args.runs} runs after {args.warmup} warm-up; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.machine()}"
    )


def main_table(args, models, train_models) -> None:
    """Train step (of ``train_models``), inference and peak memory at --height x --width,
    --batch images."""
    optimizers = {
        name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for name, m in train_models.items()
    }
    images, targets = make_batch(
        args.batch, args.height, args.width, args.objects, args.classes, seed=0
    )

    measures = [f"{phase} {clock}" for phase in ("train", "infer") for clock in ("wall", "cpu")]
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in measures} for n in models}
    detections = {}
    for round_index in range(args.warmup + args.runs):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            train_wall, train_cpu, _ = timed(
                train_step, train_models[name], optimizers[name], images, targets
            )
            infer_wall, infer_cpu, outputs = timed(inference, models[name], images)
            detections[name] = count(outputs)
            if round_index >= args.warmup:
                for measure, value in zip(
                    measures,
                    (train_wall, train_cpu, infer_wall / args.batch, infer_cpu / args.batch),
                ):
                    times[name][measure].append(value)
    memory = {
        name: {
            "train": peak_memory(train_step, train_models[name], optimizers[name], images, targets),
            "infer": peak_memory(inference, model, images),
        }
        for name, model in models.items()
    }
    report(args, models, times, memory, detections)


def report(args, models, times, memory, detections) -> None:
    """Markdown table of medians and ratios (ours / torchvision: below 1 is better)."""
    median = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    print(
        f"# train step and inference: {args.batch} images {args.height}x{args.width}, "
        f"{args.objects} objects each; detections per image: "
        + ", ".join(f"{n} {detections[n] / args.batch:.0f}" for n in models)
    )
    print("| measure | ours | torchvision | ours / torchvision |")
    print("|---|---|---|---|")
    rows = [
        ("train step, wall (s)", "train wall", median, 1.0, "{:.3f}"),
        ("train step, CPU (s)", "train cpu", median, 1.0, "{:.3f}"),
        ("inference per image, wall (s)", "infer wall", median, 1.0, "{:.3f}"),
        ("inference per image, CPU (s)", "infer cpu", median, 1.0, "{:.3f}"),
        ("peak memory, train step (MB)", "train", memory, 1e6, "{:.0f}"),
        ("peak memory, inference (MB)", "infer", memory, 1e6, "{:.0f}"),
    ]
    for label, key, table, scale, fmt in rows:
        ours, theirs = table["ours"][key] / scale, table["torchvision"][key] / scale
        ratio = ours / theirs if theirs else math.nan
        print(f"| {label} | {fmt.format(ours)} | {fmt.format(theirs)} | {ratio:.2f} |")
    print(
        "# wall-time ranges (s): "
        + "; ".join(
            f"{n} train {min(t['train wall']):.3f}-{max(t['train wall']):.3f}, "
            f"infer {min(t['infer wall']):.3f}-{max(t['infer wall']):.3f}"
            for n, t in times.items()
        )
    )


def sweep(args, ours: dict, torchvision_model) -> dict:
    """Inference alone per (size, batch), every model in turn as above: a ratio table.
    Returns, per configuration and variant other than "fp32", the agreement of its
    detections with those of the "fp32" variant when timed (same weights, same images)."""
    models = dict(ours, torchvision=torchvision_model)
    print(
        "# inference, seconds per image, about 100 detections per image; ratio: ours / "
        "torchvision, wall time (CPU time), below 1 is better"
    )
    names = list(ours)
    print(
        "| size | images | torchvision (s) | "
        + " | ".join(f"{n} (s) | {n} / torchvision" for n in names)
        + " |"
    )
    print("|---|---:|---:|" + "---:|---:|" * len(names))
    agreement = {}
    reference = ours.get(f"ours {REFERENCE}")
    for size in args.sweep_sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        # torchvision's transform must not resize: its min and max size are the image's.
        torchvision_model.transform.min_size = (min(height, width),)
        torchvision_model.transform.max_size = max(height, width)
        for batch in args.sweep_batches:
            images, _ = make_batch(batch, height, width, 1, args.classes, seed=1)
            times = {name: ([], []) for name in models}
            outputs = {}
            for round_index in range(args.warmup + args.runs):
                order = list(models) if round_index % 2 == 0 else list(reversed(models))
                for name in order:
                    wall, cpu, outputs[name] = timed(inference, models[name], images)
                    if round_index >= args.warmup:
                        times[name][0].append(wall / batch)
                        times[name][1].append(cpu / batch)
            median = {n: [statistics.median(v) for v in t] for n, t in times.items()}
            theirs = median["torchvision"]
            cells = " | ".join(
                f"{median[n][0]:.3f} | {median[n][0] / theirs[0]:.2f} "
                f"({median[n][1] / theirs[1]:.2f})"
                for n in names
            )
            print(f"| {height}x{width} | {batch} | {theirs[0]:.3f} | {cells} |")
            if reference is None:
                continue
            for name in names:
                if name != f"ours {REFERENCE}":
                    agreement[(size, batch, name)] = compare_detections(
                        outputs[f"ours {REFERENCE}"], outputs[name]
                    )
    return agreement


def compare_detections(expected, got) -> dict[str, float]:
    """How far ``got`` is from ``expected`` (lists of per-image outputs): each expected
    detection is matched to the same-class detection of highest box IoU (matched if > 0.9);
    box and score errors and mask IoU over the matched ones. Also the share matched among
    each image's 20 best expected detections and among those scoring >= 0.5 (what
    trainer.predict keeps by default): with random weights many scores are nearly equal,
    and any rounding moves the 100-detection cut among them; the best ones should hold."""
    counts = {"matched": [0, 0], "top20 matched": [0, 0], "confident matched": [0, 0]}
    box_error = score_error = 0.0
    mask_ious = []
    for exp, out in zip(expected, got):
        if len(exp["boxes"]) == 0:
            continue
        overlap = box_iou(exp["boxes"], out["boxes"]) * (
            exp["labels"][:, None] == out["labels"][None]
        )
        overlap = torch.cat((overlap, overlap.new_zeros((len(overlap), 1))), dim=1)
        best, index = overlap.max(1)
        found = best > 0.9
        top = torch.argsort(exp["scores"], descending=True)[:20]
        confident = exp["scores"] >= 0.5
        for key, among in (("matched", found), ("top20 matched", found[top])):
            counts[key][0] += int(among.sum())
            counts[key][1] += len(among)
        counts["confident matched"][0] += int(found[confident].sum())
        counts["confident matched"][1] += int(confident.sum())
        if found.any():
            i, j = found.nonzero().squeeze(1), index[found]
            box_error = max(box_error, (exp["boxes"][i] - out["boxes"][j]).abs().max().item())
            score_error = max(score_error, (exp["scores"][i] - out["scores"][j]).abs().max().item())
            inter = (exp["masks"][i] & out["masks"][j]).flatten(1).sum(1)
            union = (exp["masks"][i] | out["masks"][j]).flatten(1).sum(1)
            mask_ious.append(torch.where(union > 0, inter / union.clamp(min=1), 1.0))
    ious = torch.cat(mask_ious) if mask_ious else torch.ones(1)
    shares = {k: (n / total if total else math.nan) for k, (n, total) in counts.items()}
    return {
        **shares,
        "detections": counts["matched"][1],
        "box error (px)": box_error,
        "score error": score_error,
        "mask IoU mean": ious.mean().item(),
        "mask IoU min": ious.min().item(),
    }


def trained_agreement(args) -> dict:
    """Per image and variant other than "fp32": compare_detections of the variant with
    fp32, on --agreement-weights loaded through trainer.Detector (which resizes as the
    recipe's val set), every detection down to a score of 0."""
    from trainer import Detector

    detectors = {}
    for variant in dict.fromkeys([REFERENCE, *args.variants]):
        options = parse_variant(variant)
        overrides = {}
        for precision in {"fp32", "bf16", "fp16"} & options:
            overrides["model.inference_precision"] = precision
        if options & {"nchw", "nhwc"}:
            overrides["model.channels_last"] = "nhwc" in options
        detector = Detector.from_pretrained(
            args.agreement_weights, recipe=args.agreement_recipe, device="cpu", **overrides
        )
        compile_variant(detector.model, variant)
        detectors[variant] = detector
    agreement = {}
    for path in args.agreement_images:
        expected = detectors[REFERENCE].predict([path], score_threshold=0.0)
        for variant, detector in detectors.items():
            if variant != REFERENCE:
                got = detector.predict([path], score_threshold=0.0)
                agreement[(Path(path).name, 1, variant)] = compare_detections(expected, got)
    return agreement


def report_agreement(agreement, what: str) -> None:
    print(
        f"# detections of each variant vs ours fp32 (channels-last auto, eager), "
        f"{what}: matched = same class, box IoU > 0.9; confident: scores >= 0.5"
    )
    if not agreement:
        print(f"# (compared only when '{REFERENCE}' is among the variants)")
        return
    keys = list(next(iter(agreement.values())))
    print("| size | images | variant | " + " | ".join(keys) + " |")
    print("|---|---:|---|" + "---:|" * len(keys))
    for (size, batch, name), values in agreement.items():
        cells = " | ".join(
            f"{values[k]:.1%}" if "matched" in k else f"{values[k]:.3g}" for k in keys
        )
        print(f"| {size} | {batch} | {name.removeprefix('ours ')} | {cells} |")


if __name__ == "__main__":
    main()
