"""Images per second out of the training DataLoader, dataset load time and memory.

    python benchmarks/data_loader.py [--workers 0 1 2 4] [--batches 40] [--epochs 3]
        [--skip-coco] [--skip-pycocotools] [--keep DIR]

Two datasets, each with its recipe's training transforms and batch size:

- demo: recipes/demo.yaml's train split (800 shapes images of ~150 px, 8 per batch).
- COCO-sized: a synthetic annotation file with COCO 2017 train's counts (118,287 images,
  860,001 instances, 1% of them crowd regions as uncompressed RLE, the rest polygons of 8-40
  points) and recipes/mask_rcnn.yaml's transforms (shortest edge 800, 2 per batch). Its images
  are a pool of 16 JPEGs (640x480 and 480x640) referenced many times.

Reported: load time (parse + checks) and resident memory of the dataset, measured each in a
fresh process, next to pycocotools' ``COCO()`` on the same file (what the dataset used to
hold); images/s out of ``build_dataloader`` (what training iterates) after the workers have
started, with one torch thread per process as in DataLoader workers; memory of the loader's
processes: the main process's RSS and each worker's USS (memory only it holds, which
copy-on-access of shared annotations would grow), after the measured batches and over
successive epochs (demo) or runs of 50 batches (COCO-sized).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_recipe  # noqa: E402
from trainer.data import build_dataloader, build_dataset  # noqa: E402

COCO_IMAGES = 118_287
COCO_INSTANCES = 860_001
CROWD_FRACTION = 0.01
POOL = 16
MB = 1 << 20


def _pool_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like JPEG source: smooth gradient background with a few filled shapes."""
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = start + (xs + ys)[..., None] / 2 * (end - start)
    image = Image.fromarray(
        np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(10, 120)
        draw.ellipse(
            [x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    return image


def _polygon(rng: np.random.Generator, width: int, height: int) -> tuple[str, str, float]:
    """(bbox json, segmentation json, area) of a random star-shaped polygon in the image."""
    points = int(rng.integers(8, 41))
    w, h = rng.uniform(8, width / 2), rng.uniform(8, height / 2)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radius = rng.uniform(0.6, 1.0, points)
    xs = np.round(x0 + w / 2 * (1 + radius * np.cos(angles)), 2)
    ys = np.round(y0 + h / 2 * (1 + radius * np.sin(angles)), 2)
    coords = ",".join(f"{v:.2f}" for v in np.stack([xs, ys], 1).ravel())
    bbox = [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    return "[" + ",".join(f"{v:.2f}" for v in bbox) + "]", f"[[{coords}]]", 0.7 * bbox[2] * bbox[3]


def _crowd(rng: np.random.Generator, width: int, height: int) -> tuple[str, str, float]:
    """A crowd region as COCO writes them: uncompressed RLE of a rectangle (column-major)."""
    w, h = int(rng.integers(40, width // 2)), int(rng.integers(40, height // 2))
    x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    counts = [x0 * height + y0]
    for _ in range(w - 1):
        counts += [h, height - h]
    counts += [h, height * width - sum(counts) - h]
    segm = json.dumps({"counts": counts, "size": [height, width]}, separators=(",", ":"))
    return f"[{x0},{y0},{w},{h}]", segm, float(w * h)


def generate_coco_like(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write root/images/pool_XX.jpg and root/instances.json; -> (ann_file, img_dir)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    sizes = [(640, 480) if k % 3 else (480, 640) for k in range(POOL)]
    for k, (width, height) in enumerate(sizes):
        _pool_image(rng, width, height).save(img_dir / f"pool_{k:02d}.jpg", quality=90)
    # Instances per image: COCO's total, spread at random (about Poisson with mean 7.3).
    per_image = rng.multinomial(COCO_INSTANCES, np.full(COCO_IMAGES, 1 / COCO_IMAGES))
    # Annotation text comes from a pool too (256 per pool image), so writing stays fast.
    templates = {}
    for k, (width, height) in enumerate(sizes):
        templates[k] = [
            _crowd(rng, width, height)
            if rng.random() < CROWD_FRACTION
            else _polygon(rng, width, height)
            for _ in range(256)
        ]
    pool_of = rng.integers(0, POOL, COCO_IMAGES)
    images, annotations = [], []
    ann_id = 0
    for image_id in range(1, COCO_IMAGES + 1):
        k = int(pool_of[image_id - 1])
        width, height = sizes[k]
        images.append(
            f'{{"id":{image_id},"file_name":"pool_{k:02d}.jpg","width":{width},'
            f'"height":{height},"license":1,"date_captured":"2013-11-14 11:18:45"}}'
        )
        for t in rng.integers(0, 256, per_image[image_id - 1]):
            bbox, segm, area = templates[k][t]
            ann_id += 1
            crowd = int(segm.startswith("{"))
            annotations.append(
                f'{{"segmentation":{segm},"area":{area:.2f},"iscrowd":{crowd},'
                f'"image_id":{image_id},"bbox":{bbox},"category_id":{1 + ann_id % 80},'
                f'"id":{ann_id}}}'
            )
    categories = ",".join(
        f'{{"id":{c},"name":"class{c}","supercategory":"s"}}' for c in range(1, 81)
    )
    ann_file = root / "instances.json"
    with open(ann_file, "w") as f:
        f.write('{"info":{},"licenses":[],"images":[' + ",".join(images) + "],")
        f.write('"annotations":[' + ",".join(annotations) + "],")
        f.write(f'"categories":[{categories}]}}')
    return ann_file, img_dir


def _recipe_train(recipe: str, overrides: list[str]):
    return load_recipe(ROOT / "recipes" / recipe, overrides)


def _measure_load(kind: str, ann_file: str, img_dir: str, overrides: list[str], queue) -> None:
    """In a fresh process: seconds to build, RSS growth and peak (MB)."""
    process = psutil.Process()
    if kind == "pycocotools":
        import contextlib
        import io

        from pycocotools.coco import COCO

        before = process.memory_info().rss
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            held = COCO(ann_file)
    else:
        cfg = _recipe_train("mask_rcnn.yaml", overrides)
        before = process.memory_info().rss
        started = time.perf_counter()
        held = build_dataset(cfg.data.train)
    seconds = time.perf_counter() - started
    rss = process.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((seconds, (rss - before) / MB, (peak - before) / MB))
    del held


def load_in_fresh_process(kind: str, ann_file: Path, img_dir: Path, overrides: list[str]):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_measure_load, args=(kind, str(ann_file), str(img_dir), overrides, queue)
    )
    process.start()
    result = queue.get()
    process.join()
    return result


def memory(others: set[int]) -> tuple[float, list[float]]:
    """(main RSS, [worker USS]) in MB; ``others``: child pids that are not loader workers."""
    main = psutil.Process()
    workers = [p for p in main.children() if p.pid not in others and p.is_running()]
    uss = []
    for worker in workers:
        try:
            uss.append(worker.memory_full_info().uss / MB)
        except psutil.Error:
            continue
    return main.memory_info().rss / MB, uss


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def throughput(dataset, imgs_per_gpu: int, workers: int, batches: int) -> dict:
    others = _children()
    loader = build_dataloader(dataset, imgs_per_gpu, workers, shuffle=True, seed=0)
    batches = min(batches, len(loader) - 1)
    it = iter(loader)
    next(it)  # workers started and warm
    _, uss_start = memory(others)
    started = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += len(next(it)[0])
    seconds = time.perf_counter() - started
    rss, uss_end = memory(others)
    del it, loader
    return {
        "workers": workers,
        "images_per_s": images / seconds,
        "main_rss": rss,
        "worker_uss_start": sum(uss_start) / max(len(uss_start), 1),
        "worker_uss_end": sum(uss_end) / max(len(uss_end), 1),
    }


def memory_over_time(
    dataset, imgs_per_gpu: int, workers: int, chunks: int, batches: int | None
) -> list[dict]:
    """Memory after each of ``chunks`` runs of ``batches`` batches (None: a full epoch)."""
    others = _children()
    loader = build_dataloader(dataset, imgs_per_gpu, workers, shuffle=True, seed=0)
    it = iter(loader)
    out = []
    for chunk in range(chunks):
        started = time.perf_counter()
        if batches is None:
            count = sum(len(images) for images, _ in loader)
        else:
            count = 0
            for _ in range(batches):
                try:
                    count += len(next(it)[0])
                except StopIteration:
                    it = iter(loader)
        rss, uss = memory(others)
        seconds = time.perf_counter() - started
        out.append(
            {
                "chunk": chunk + 1,
                "images": count,
                "seconds": seconds,
                "main_rss": rss,
                "worker_uss": uss,
            }
        )
    return out


def print_memory(title: str, unit: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print(f"| {unit} | images | seconds | main RSS (MB) | worker USS (MB, each) |")
    print("|---:|---:|---:|---:|---|")
    for r in rows:
        uss = ", ".join(f"{u:.0f}" for u in r["worker_uss"])
        print(
            f"| {r['chunk']} | {r['images']} | {r['seconds']:.1f} | {r['main_rss']:.0f} | {uss} |"
        )


def print_throughput(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| workers | images/s | main RSS (MB) | worker USS start -> end (MB, each) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        uss = f"{r['worker_uss_start']:.0f} -> {r['worker_uss_end']:.0f}" if r["workers"] else "-"
        print(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['main_rss']:.0f} | {uss} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--epochs", type=int, default=3, help="full demo epochs for memory")
    parser.add_argument("--chunks", type=int, default=5, help="COCO-sized runs of 50 batches")
    parser.add_argument("--skip-coco", action="store_true")
    parser.add_argument("--skip-pycocotools", action="store_true")
    parser.add_argument("--keep", type=Path, help="write the COCO-sized set here and keep it")
    args = parser.parse_args(argv)
    # As in DataLoader workers: one thread, so workers=0 measures the loading work itself, not
    # intra-op threads competing for the cores.
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")

    os.chdir(ROOT)  # the demo recipe's data/shapes
    demo = build_dataset(_recipe_train("demo.yaml", []).data.train)
    rows = [throughput(demo, 8, w, args.batches) for w in args.workers]
    print_throughput(f"demo set ({len(demo)} images, batch 8)", rows)
    rows = memory_over_time(demo, 8, 2, args.epochs, None)
    print_memory("demo set, 2 workers, full epochs", "epoch", rows)
    if args.skip_coco:
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        started = time.perf_counter()
        ann_file, img_dir = generate_coco_like(root)
        print(
            f"\nCOCO-sized synthetic set: generated in {time.perf_counter() - started:.1f} s, "
            f"{ann_file.stat().st_size / MB:.0f} MB of json\n"
        )
        overrides = [f"data.train.ann_file={ann_file}", f"data.train.img_dir={img_dir}"]
        print("| load | seconds | RSS growth (MB) | peak RSS growth (MB) |")
        print("|---|---:|---:|---:|")
        loads = [
            ("CocoDataset (parse + annotation and image-header checks)", "ours", overrides),
            (
                "CocoDataset, check_images=false",
                "ours",
                overrides + ["data.train.check_images=false"],
            ),
        ]
        if not args.skip_pycocotools:
            loads.append(("pycocotools COCO()", "pycocotools", overrides))
        for name, kind, extra in loads:
            seconds, rss, peak = load_in_fresh_process(kind, ann_file, img_dir, extra)
            print(f"| {name} | {seconds:.1f} | {rss:.0f} | {peak:.0f} |")
        coco = build_dataset(_recipe_train("mask_rcnn.yaml", overrides).data.train)
        rows = [throughput(coco, 2, w, args.batches) for w in args.workers]
        print_throughput(f"COCO-sized set ({len(coco)} images, batch 2, shortest edge 800)", rows)
        rows = memory_over_time(coco, 2, 2, args.chunks, 50)
        print_memory("COCO-sized set, 2 workers, successive runs of 50 batches", "run", rows)


if __name__ == "__main__":
    main()
