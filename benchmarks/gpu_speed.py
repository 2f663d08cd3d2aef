"""Training and inference images/s of our Mask R-CNN and torchvision's, one JSON line.

The R50-FPN models of ``model_speed.py`` (same backbone, head sizes and sampling settings,
80 classes, no resizing) on the same synthetic COCO-sized batch (2 images of 800x1216, 7
objects with masks each; about 100 detections per image at inference), both under the
same autocast (bf16 by default, as `accelerate launch --mixed_precision bf16` trains),
timed alternately in one process: ``--rounds`` rounds of ``--steps`` training steps, then
the same for inference, each round timing ours and torchvision's back to back (the order
flips every round). Prints one JSON line: images/s of each and ours / torchvision (above 1
is better here), and peak memory; in under ten minutes on a current GPU.

    python benchmarks/gpu_speed.py                          # on the first GPU
    python benchmarks/gpu_speed.py --precision fp32 --compile
    python benchmarks/gpu_speed.py --device cpu --backbone resnet18 --height 256 --width 320 \
        --steps 1 --rounds 1          # a quick try of the script itself
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import (  # noqa: E402
    amp_train_step,
    build_ours,
    build_torchvision,
    favour_classes,
    make_batch,
)
from throughput import synchronize  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="default: the first accelerator, else the CPU")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    parser.add_argument("--compile", action="store_true", help="ours: compile_for_inference")
    parser.add_argument("--batch", type=int, default=2, help="images per step (COCO: 2/GPU)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--objects", type=int, default=7, help="COCO: 7.3 per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=3, help="steps of each before timing")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    if args.device:
        device = torch.device(args.device)
    elif torch.accelerator.is_available():
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)
    # fp32 weights and autocast for both: what the training loop does.
    models = {
        "ours": build_ours(args.backbone, args.classes, "fp32"),
        "torchvision": build_torchvision(args.backbone, args.classes, args.height, args.width),
    }
    favour_classes(models["ours"].roi_heads.box_head.cls_score, 4)
    favour_classes(models["torchvision"].roi_heads.box_predictor.cls_score, 4)
    optimizers = {}
    for name, model in models.items():
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizers[name] = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    images, targets = make_batch(
        args.batch, args.height, args.width, args.objects, args.classes, seed=0
    )
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    dtype = DTYPES[args.precision]
    scalers = {
        name: torch.amp.GradScaler(device.type, enabled=args.precision == "fp16") for name in models
    }

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(name: str) -> None:
        amp_train_step(models[name], optimizers[name], scalers[name], dtype, images, targets)

    @torch.no_grad()
    def infer(name: str) -> int:
        with autocast():
            return sum(len(output["boxes"]) for output in models[name](images))

    results: dict = {}
    detections = {}
    for phase, step in (("train", train_step), ("inference", infer)):
        if phase == "inference" and args.compile:
            from trainer.models import compile_for_inference

            compile_for_inference(models["ours"].eval())
        for model in models.values():
            model.train(phase == "train")
        for name in models:
            for _ in range(args.warmup):
                step(name)
        per_image = {name: [] for name in models}
        peak = {}
        for round_index in range(args.rounds):
            order = list(models) if round_index % 2 == 0 else list(reversed(models))
            for name in order:
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    outcome = step(name)
                synchronize(device)
                per_image[name].append((time.perf_counter() - start) / args.steps / args.batch)
                if device.type == "cuda":
                    peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device))
                if phase == "inference":
                    detections[name] = outcome / args.batch
        rate = {name: 1.0 / statistics.median(times) for name, times in per_image.items()}
        results[phase] = {
            "ours_images_per_s": round(rate["ours"], 2),
            "torchvision_images_per_s": round(rate["torchvision"], 2),
            "ours_over_torchvision": round(rate["ours"] / rate["torchvision"], 3),
        }
        if peak:
            results[phase]["peak_memory_gib"] = {k: round(v / 2**30, 2) for k, v in peak.items()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    line = {
        "device": name,
        "torch": torch.__version__,
        "model": f"{args.backbone}-FPN",
        "precision": args.precision,
        "compiled_inference": args.compile,
        "batch": args.batch,
        "size": [args.height, args.width],
        "detections_per_image": {k: round(v, 1) for k, v in detections.items()},
        "median_of": f"{args.rounds} rounds of {args.steps} steps after {args.warmup}",
        **results,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
