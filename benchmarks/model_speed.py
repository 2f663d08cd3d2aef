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

Inference options of our model (``--channels-last``, ``--precision``, ``--compile``) apply to
ours only; torchvision's stays in its defaults (fp32, NCHW, eager). When an option is not
the default, the detections of our model with it are compared with those of the same
weights without it (matched detections, box, score and mask differences).

    python benchmarks/model_speed.py                       # ResNet-50-FPN, 2 x 384x512, sweep
    python benchmarks/model_speed.py --backbone resnet18 --height 320 --width 480
    python benchmarks/model_speed.py --skip-main --sweep-sizes 384x512 800x1088 --sweep-batches 1 2
    python benchmarks/model_speed.py --skip-main --precision bf16   # and its agreement with fp32

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

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import box_iou

from trainer.config import ModelConfig
from trainer.models import build_detector


def build_ours(
    backbone: str, num_classes: int, channels_last: str = "auto", precision: str = "fp32"
) -> torch.nn.Module:
    cfg = OmegaConf.structured(ModelConfig)
    cfg.backbone.name = backbone
    cfg.backbone.pretrained = False
    # torchvision's defaults for a detection ResNet: frozen BN, stem and layer1 frozen.
    cfg.backbone.frozen_stages = 1
    cfg.backbone.frozen_bn = True
    # Set only when not the default, so that the script also measures older versions.
    if channels_last != "auto":
        cfg.channels_last = channels_last == "on"
    if precision != "fp32":
        cfg.inference_precision = precision
    return build_detector(cfg, num_classes=num_classes)


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
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="ours: model.channels_last (auto: null, channels-last on the CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="ours: model.inference_precision",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="ours: trainer.models.compile_for_inference (compiled before the warm-up)",
    )
    parser.add_argument(
        "--inference-mode",
        action="store_true",
        help="both: inference under torch.inference_mode() instead of torch.no_grad()",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inference_mode:
        GRAD_MODE["context"] = torch.inference_mode
    torch.manual_seed(0)
    models = {
        "ours": build_ours(args.backbone, args.classes, args.channels_last, args.precision),
        "torchvision": build_torchvision(args.backbone, args.classes, args.height, args.width),
    }
    favour_classes(models["ours"].roi_heads.box_head.cls_score, 4)
    favour_classes(models["torchvision"].roi_heads.box_predictor.cls_score, 4)
    reference = None
    if args.channels_last != "auto" or args.precision != "fp32" or args.compile:
        # The same weights without the options, for the detections' agreement.
        reference = build_ours(args.backbone, args.classes).eval()
        reference.load_state_dict(models["ours"].state_dict())
    # A compiled model's weights are constants: its train steps run on an eager copy.
    trained = dict(models, ours=copy.deepcopy(models["ours"])) if args.compile else models
    if args.compile:
        from trainer.models import compile_for_inference

        compile_for_inference(models["ours"])
    print(header(args))
    if not args.skip_main:
        main_table(args, models, trained)
    agreement = {}
    if args.sweep_sizes and args.sweep_batches:
        print()
        agreement = sweep(args, models, reference)
    if reference is not None:
        print()
        report_agreement(args, agreement)


def header(args) -> str:
    options = (
        f"channels-last {args.channels_last}, {args.precision}"
        + (", compiled" if args.compile else "")
        + (", inference_mode" if args.inference_mode else "")
    )
    return (
        f"# {args.backbone}-FPN, {args.classes} classes; ours: {options}; median of "
        f"{args.runs} runs after {args.warmup} warm-up; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.machine()}"
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


def sweep(args, models, reference) -> dict:
    """Inference alone per (size, batch), interleaved as above: a ratio table. Returns the
    agreement of ours with ``reference`` per configuration (when given)."""
    torchvision_model = models["torchvision"]
    print(
        "# inference per image (s), about 100 detections per image: ours / torchvision "
        "(below 1 is better)"
    )
    print("| size | images | ours (s) | torchvision (s) | ours / torchvision | CPU time ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    agreement = {}
    if reference is not None:  # the main table's train steps moved our weights
        reference.load_state_dict(models["ours"].state_dict())
    for size in args.sweep_sizes:
        height, width = (int(v) for v in size.lower().split("x"))
        # torchvision's transform must not resize: its min and max size are the image's.
        torchvision_model.transform.min_size = (min(height, width),)
        torchvision_model.transform.max_size = max(height, width)
        for batch in args.sweep_batches:
            images, _ = make_batch(batch, height, width, 1, args.classes, seed=1)
            times = {name: ([], []) for name in models}
            for round_index in range(args.warmup + args.runs):
                order = list(models) if round_index % 2 == 0 else list(reversed(models))
                for name in order:
                    wall, cpu, _ = timed(inference, models[name], images)
                    if round_index >= args.warmup:
                        times[name][0].append(wall / batch)
                        times[name][1].append(cpu / batch)
            ours, theirs = (
                [statistics.median(v) for v in times[n]] for n in ("ours", "torchvision")
            )
            print(
                f"| {height}x{width} | {batch} | {ours[0]:.3f} | {theirs[0]:.3f} | "
                f"{ours[0] / theirs[0]:.2f} | {ours[1] / theirs[1]:.2f} |"
            )
            if reference is not None:
                agreement[(size, batch)] = compare_detections(
                    inference(reference, images), inference(models["ours"], images)
                )
    return agreement


def compare_detections(expected, got) -> dict[str, float]:
    """How far ``got`` is from ``expected`` (lists of per-image outputs): each expected
    detection is matched to the same-class detection of highest box IoU (matched if > 0.9);
    box and score errors and mask IoU over the matched ones; the same count over each
    image's 20 best expected detections (the 100-detection cut among near-equal scores of
    random weights moves with any rounding, the best ones should not)."""
    matched = total = top_matched = top_total = 0
    box_error = score_error = 0.0
    mask_ious = []
    for exp, out in zip(expected, got):
        if len(exp["boxes"]) == 0:
            continue
        overlap = box_iou(exp["boxes"], out["boxes"]) * (
            exp["labels"][:, None] == out["labels"][None]
        )
        if overlap.shape[1] == 0:
            overlap = overlap.new_zeros((len(exp["boxes"]), 1))
            index = torch.zeros(len(exp["boxes"]), dtype=torch.int64)
            best = overlap[:, 0]
        else:
            best, index = overlap.max(1)
        found = best > 0.9
        top = torch.argsort(exp["scores"], descending=True)[:20]
        matched, total = matched + int(found.sum()), total + len(found)
        top_matched, top_total = top_matched + int(found[top].sum()), top_total + len(top)
        if found.any():
            i, j = found.nonzero().squeeze(1), index[found]
            box_error = max(box_error, (exp["boxes"][i] - out["boxes"][j]).abs().max().item())
            score_error = max(score_error, (exp["scores"][i] - out["scores"][j]).abs().max().item())
            inter = (exp["masks"][i] & out["masks"][j]).flatten(1).sum(1)
            union = (exp["masks"][i] | out["masks"][j]).flatten(1).sum(1)
            mask_ious.append(torch.where(union > 0, inter / union.clamp(min=1), 1.0))
    ious = torch.cat(mask_ious) if mask_ious else torch.ones(1)
    return {
        "matched": matched / max(total, 1),
        "top20 matched": top_matched / max(top_total, 1),
        "box error (px)": box_error,
        "score error": score_error,
        "mask IoU mean": ious.mean().item(),
        "mask IoU min": ious.min().item(),
    }


def report_agreement(args, agreement) -> None:
    print(
        f"# detections of ours with the options above vs the same weights without them "
        f"(fp32, channels-last auto, eager): {args.precision}, channels-last "
        f"{args.channels_last}" + (", compiled" if args.compile else "")
    )
    if not agreement:
        print("# (no sweep ran: nothing compared)")
        return
    keys = list(next(iter(agreement.values())))
    print("| size | images | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for (size, batch), values in agreement.items():
        cells = " | ".join(
            f"{values[k]:.1%}" if "matched" in k else f"{values[k]:.2g}" for k in keys
        )
        print(f"| {size} | {batch} | {cells} |")


if __name__ == "__main__":
    main()
