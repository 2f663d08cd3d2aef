"""Our Mask R-CNN against torchvision's, same backbone family and head sizes, same inputs.

Both models are built in one process and run alternately (ours first on even rounds,
torchvision's first on odd ones), so drift in machine load hits both. Reported, as medians
and as ratios ours / torchvision (below 1 is better):
- a training step (forward, backward, SGD step): wall time, and CPU time of the process,
  which counts the work done and is steadier on a machine that runs other jobs;
- inference per image with about 100 detections per image (so mask pasting counts);
- peak memory of each: the largest rise of allocated tensor bytes during the call, from
  torch.profiler's allocation events.

    python benchmarks/model_speed.py                       # ResNet-50-FPN, 2 x 384x512
    python benchmarks/model_speed.py --backbone resnet18 --height 320 --width 480

Goals on a 2-core CPU: train step <= 0.8x torchvision's time, inference <= 0.5x, peak
memory <= 1.0x.
"""

from __future__ import annotations

import argparse
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

from trainer.config import ModelConfig
from trainer.models import build_detector


def build_ours(backbone: str, num_classes: int) -> torch.nn.Module:
    cfg = OmegaConf.structured(ModelConfig)
    cfg.backbone.name = backbone
    cfg.backbone.pretrained = False
    # torchvision's defaults for a detection ResNet: frozen BN, stem and layer1 frozen.
    cfg.backbone.frozen_stages = 1
    cfg.backbone.frozen_bn = True
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


@torch.no_grad()
def inference(model, images) -> int:
    model.eval()
    return sum(len(output["boxes"]) for output in model(images))


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
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "ours": build_ours(args.backbone, args.classes),
        "torchvision": build_torchvision(args.backbone, args.classes, args.height, args.width),
    }
    favour_classes(models["ours"].roi_heads.box_head.cls_score, 4)
    favour_classes(models["torchvision"].roi_heads.box_predictor.cls_score, 4)
    optimizers = {
        name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        for name, m in models.items()
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
            model = models[name]
            train_wall, train_cpu, _ = timed(train_step, model, optimizers[name], images, targets)
            infer_wall, infer_cpu, detections[name] = timed(inference, model, images)
            if round_index >= args.warmup:
                for measure, value in zip(
                    measures,
                    (train_wall, train_cpu, infer_wall / args.batch, infer_cpu / args.batch),
                ):
                    times[name][measure].append(value)
    memory = {
        name: {
            "train": peak_memory(train_step, model, optimizers[name], images, targets),
            "infer": peak_memory(inference, model, images),
        }
        for name, model in models.items()
    }
    report(args, models, times, memory, detections)


def report(args, models, times, memory, detections) -> None:
    """Markdown table of medians and ratios (ours / torchvision: below 1 is better)."""
    median = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    print(
        f"# {args.backbone}-FPN, {args.batch} images {args.height}x{args.width}, "
        f"{args.objects} objects each, {args.classes} classes; median of {args.runs} runs after "
        f"{args.warmup} warm-up; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(
        "# detections per image: "
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


if __name__ == "__main__":
    main()
