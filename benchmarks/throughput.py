"""Training and inference throughput of a recipe's detector on synthetic COCO-sized images.

Builds the model of a recipe (random weights: nothing to download), feeds it the same kind
of batch the recipe's data would (``imgs_per_gpu`` images of ``--height`` x ``--width``,
``--objects`` objects with masks each) and reports images per second for training steps
(forward, backward, SGD step) and inference, and the peak device memory of each. One
process, one device: the per-GPU figure that a multi-GPU run multiplies.

    python benchmarks/throughput.py recipes/mask_rcnn.yaml --precision bf16
    python benchmarks/throughput.py recipes/mask_rcnn.yaml --precision bf16 --compile

Reference: detectron2's R50-FPN Mask R-CNN 1x trains at 0.261 s/iter for 16 images on
8 V100s (fp16), i.e. 61 images/s in all or 7.7 per GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_speed import amp_train_step, favour_classes, make_batch  # noqa: E402

from trainer.config import load_recipe  # noqa: E402
from trainer.models import build_detector  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe whose model and imgs_per_gpu to use")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile backbone + FPN")
    parser.add_argument("--height", type=int, default=800, help="COCO: shortest edge 800")
    parser.add_argument("--width", type=int, default=1216, help="COCO: ~1200 on average")
    parser.add_argument("--objects", type=int, default=7, help="COCO: 7.3 per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cfg = load_recipe(args.recipe, [*args.overrides, "model.backbone.pretrained=false"])
    available = torch.accelerator.is_available()
    device = torch.accelerator.current_accelerator() if available else torch.device("cpu")
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=args.classes).to(device)
    favour_classes(model.roi_heads.box_head.cls_score, 4)  # ~100 detections per image
    if args.compile:
        model.backbone.compile(dynamic=True)
        model.fpn.compile(dynamic=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = cfg.data.imgs_per_gpu
    images, targets = make_batch(batch, args.height, args.width, args.objects, args.classes, 0)
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    dtype = DTYPES[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_step() -> None:
        amp_train_step(model, optimizer, scaler, dtype, images, targets)

    @torch.no_grad()
    def infer() -> int:
        with autocast():
            return sum(len(out["boxes"]) for out in model(images))

    results = {}
    for phase, step in (("train", train_step), ("inference", infer)):
        model.train(phase == "train")
        for _ in range(args.warmup):
            step()
        synchronize(device)
        reset_peak(device)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        results[phase] = (statistics.median(times), peak_gib(device))
    detections = infer() / batch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# {Path(args.recipe).name} ({cfg.model.backbone.name}), {batch} images of "
        f"{args.height}x{args.width} per step, {args.objects} objects each, "
        f"{detections:.0f} detections per image at inference; {args.precision}"
        f"{', compiled backbone + FPN' if args.compile else ''}; {name}, torch "
        f"{torch.__version__}; median of {args.steps} steps after {args.warmup}"
    )
    print("| phase | s / step | images / s | peak memory (GiB) |")
    print("|---|---:|---:|---:|")
    for phase, (seconds, peak) in results.items():
        print(f"| {phase} | {seconds:.3f} | {batch / seconds:.1f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
