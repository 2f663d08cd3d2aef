"""CPU inference: our detector exported to ONNX under onnxruntime, against the same model in
PyTorch and torchvision's Mask R-CNN.

The models and the synthetic image are those of ``benchmarks/model_speed.py`` (same
backbone and head sizes, 80 classes, classifier biased to keep about 100 detections per
image, so the mask head and pasting run at full load). One image per call, since the
exported graph takes one; each call returns masks pasted at the image's size (for ONNX:
the graph, then ``trainer/onnx_model.py``'s numpy paste). Calls alternate between the
models in each round. Medians of wall and CPU time per image; ratios to ours in PyTorch.

    python benchmarks/onnx_speed.py                          # ResNet-50-FPN, 384x512
    python benchmarks/onnx_speed.py --backbone resnet18 --runs 9 --threads 2

Needs ``pip install 'trainer[export]'``. The export itself takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import build_ours, build_torchvision, favour_classes  # noqa: E402

from trainer.config import load_recipe  # noqa: E402
from trainer.export import export_onnx  # noqa: E402
from trainer.onnx_model import OnnxMaskRCNN  # noqa: E402
from trainer.weights.classes import ModelClasses  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes/mask_rcnn.yaml"


def timed(fn, *args) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, detections)."""
    wall, cpu = time.perf_counter(), time.process_time()
    detections = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", help="resnet18/34/50/101")
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="threads of each (0: default)")
    parser.add_argument(
        "--export-dir", help="keep the export here; a later run with the same options reuses it"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = build_ours(args.backbone, args.classes).eval()
    theirs = build_torchvision(args.backbone, args.classes, args.height, args.width).eval()
    favour_classes(ours.roi_heads.box_head.cls_score, 4)
    favour_classes(theirs.roi_heads.box_predictor.cls_score, 4)

    cfg = load_recipe(
        RECIPE,
        [
            f"data.val.min_size=[{min(args.height, args.width)}]",
            f"data.val.max_size={max(args.height, args.width)}",
        ],
    )
    classes = ModelClasses([f"class{k}" for k in range(1, args.classes + 1)])
    with tempfile.TemporaryDirectory() as folder:
        folder = args.export_dir or folder
        path, export_seconds = Path(folder) / "model.onnx", float("nan")
        if not path.is_file():
            start = time.perf_counter()
            export_onnx(ours, cfg, classes, folder)
            export_seconds = time.perf_counter() - start
        runtime = OnnxMaskRCNN(path, threads=args.threads)

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8, generator=g)
    array, size = image.numpy(), (args.height, args.width)

    @torch.no_grad()
    def run_ours() -> int:
        return len(ours([image])[0]["boxes"])

    @torch.no_grad()
    def run_torchvision() -> int:
        return len(theirs([image.float() / 255])[0]["boxes"])

    def run_onnx() -> int:
        return len(runtime.postprocess(runtime.run(array), size, size)["boxes"])

    calls = {"ours (PyTorch)": run_ours, "ours (ONNX)": run_onnx, "torchvision": run_torchvision}
    times = {name: {"wall": [], "cpu": []} for name in calls}
    detections = {}
    for round_index in range(args.warmup + args.runs):
        names = list(calls) if round_index % 2 == 0 else list(reversed(calls))
        for name in names:
            wall, cpu, detections[name] = timed(calls[name])
            if round_index >= args.warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)

    median = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    reference = median["ours (PyTorch)"]
    print(
        f"# {args.backbone}-FPN, one image {args.height}x{args.width}, {args.classes} classes; "
        f"median of {args.runs} runs after {args.warmup} warm-up; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, {platform.machine()}; export took {export_seconds:.0f} s"
    )
    print("| model | detections | wall (s) | CPU (s) | wall / ours (PyTorch) |")
    print("|---|---:|---:|---:|---:|")
    for name in calls:
        m = median[name]
        print(
            f"| {name} | {detections[name]} | {m['wall']:.3f} | {m['cpu']:.3f} | "
            f"{m['wall'] / reference['wall']:.2f} |"
        )
    print(
        "# wall-time ranges (s): "
        + "; ".join(f"{n} {min(t['wall']):.3f}-{max(t['wall']):.3f}" for n, t in times.items())
    )


if __name__ == "__main__":
    main()
