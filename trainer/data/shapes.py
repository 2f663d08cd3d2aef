"""Deterministic synthetic COCO-format instance-segmentation dataset: "shapes".

Each image (sides in [0.8, 1.0] * image_size, so most are not square) has a low-contrast textured
background (smooth colour gradient, stripes in half the images, pixel noise) and 1-5 solid-colour
instances of circles, squares (rotated up to 15 degrees) and triangles (any rotation), each 12-45 %
of the image side, placed at random. Later shapes occlude earlier ones; an occluded instance is
annotated by its visible part as compressed RLE, an unoccluded one as a polygon, so consumers
see both segmentation formats. Masks are rasterised with pycocotools itself, so every annotation's
bbox and area agree exactly with what ``COCO.annToMask`` decodes.

Layout written by :func:`generate_shapes`::

    root/train/000001.png ...    root/annotations/train.json
    root/val/000001.png ...      root/annotations/val.json

CLI: ``python -m trainer.data.shapes OUT [--num-train N] [--num-val N] [--image-size S] [--seed S]``
"""

import argparse
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from shutil import rmtree

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASSES = ("circle", "square", "triangle")
SPLITS = ("train", "val")

MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 20
# Euclidean RGB distance a shape's colour keeps from the background under it and from the other
# shapes in the image, so every boundary is visible.
MIN_COLOUR_DISTANCE = 90.0
PLACEMENT_TRIES = 10
COLOUR_CANDIDATES = 16


@dataclass
class _Instance:
    category_id: int
    polygon: list[float]
    full: np.ndarray  # bool (h, w): the whole shape
    visible: np.ndarray  # bool (h, w): the part later shapes leave uncovered
    colour: np.ndarray


def _shape_polygon(
    rng: np.random.Generator, category_id: int, width: int, height: int
) -> list[float]:
    """Random polygon [x1, y1, x2, y2, ...] of the class, lying entirely inside the image."""
    size = rng.uniform(0.12, 0.45) * min(width, height)
    name = CLASSES[category_id - 1]
    if name == "circle":
        vertices = int(rng.integers(24, 33))
        radius = size / 2
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(vertices) / vertices
    elif name == "square":
        radius = size / np.sqrt(2)
        angles = np.pi / 4 + rng.uniform(-np.pi / 12, np.pi / 12) + np.pi / 2 * np.arange(4)
    else:
        radius = size / np.sqrt(3)  # circumradius of an equilateral triangle of side `size`
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi / 3 * np.arange(3)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    # Rounded before rasterising, so the mask is exactly what the written polygon decodes to.
    return np.round(points.ravel(), 2).tolist()


def _rasterise(polygon: list[float], width: int, height: int) -> np.ndarray:
    """Boolean mask of a polygon, using the same rasteriser as ``COCO.annToMask``."""
    rles = mask_utils.frPyObjects([polygon], height, width)
    return mask_utils.decode(rles)[:, :, 0].astype(bool)


def _keeps_enough(visible: np.ndarray, full: np.ndarray) -> bool:
    return bool(visible.sum() >= max(MIN_VISIBLE_FRACTION * full.sum(), MIN_VISIBLE_PIXELS))


def _pick_colour(
    rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, others: list[np.ndarray]
) -> np.ndarray:
    """A random colour far from the canvas under ``mask`` and from the image's other shapes."""
    references = np.array([canvas[mask].mean(axis=0), *others])
    candidates = rng.integers(0, 256, (COLOUR_CANDIDATES, 3)).astype(np.float64)
    distance = np.linalg.norm(candidates[:, None] - references[None], axis=2).min(axis=1)
    good = np.flatnonzero(distance >= MIN_COLOUR_DISTANCE)
    return candidates[good[0] if good.size else distance.argmax()]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Float RGB canvas: a gentle linear colour gradient, with faint grey stripes half the time."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = xs * np.cos(theta) + ys * np.sin(theta)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1.0)
    start = rng.uniform(50, 205, 3)
    end = np.clip(start + rng.uniform(-50, 50, 3), 0, 255)
    canvas = start + ramp[..., None] * (end - start)
    if rng.random() < 0.5:
        phi = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        phase = 2 * np.pi * (xs * np.cos(phi) + ys * np.sin(phi)) / period
        canvas += rng.uniform(6, 14) * np.sin(phase + rng.uniform(0, 2 * np.pi))[..., None]
    return canvas


def _render_image(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[_Instance]]:
    """One uint8 RGB image and its instances, in painting order."""
    width, height = (int(v) for v in np.round(rng.uniform(0.8, 1.0, 2) * image_size))
    canvas = _background(rng, width, height)
    instances: list[_Instance] = []
    for _ in range(int(rng.integers(1, 6))):
        category_id = int(rng.integers(1, len(CLASSES) + 1))
        # Rather than dropping an instance that a new shape hides too much (which would leave an
        # unannotated visible fragment, teaching the model that objects are background), reject
        # the new shape's placement and retry; skip the shape if no placement works.
        for _ in range(PLACEMENT_TRIES):
            polygon = _shape_polygon(rng, category_id, width, height)
            full = _rasterise(polygon, width, height)
            if _keeps_enough(full, full) and all(
                _keeps_enough(inst.visible & ~full, inst.full) for inst in instances
            ):
                break
        else:
            continue
        colour = _pick_colour(rng, canvas, full, [inst.colour for inst in instances])
        for inst in instances:
            inst.visible &= ~full
        canvas[full] = colour
        instances.append(_Instance(category_id, polygon, full, full.copy(), colour))
    # Noise over shapes too, so shape interiors are not perfectly flat.
    canvas += rng.normal(0, rng.uniform(3, 8), canvas.shape)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), instances


def _annotation(inst: _Instance, image_id: int, annotation_id: int) -> dict:
    """COCO annotation of the visible part: polygon if unoccluded, compressed RLE otherwise."""
    ys, xs = np.nonzero(inst.visible)
    x0, y0 = int(xs.min()), int(ys.min())
    if np.array_equal(inst.visible, inst.full):
        segmentation: list | dict = [inst.polygon]
    else:
        rle = mask_utils.encode(np.asfortranarray(inst.visible.astype(np.uint8)))
        height, width = inst.visible.shape
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": inst.category_id,
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "area": int(inst.visible.sum()),
        "iscrowd": 0,
        "segmentation": segmentation,
    }


def _write_split(
    out: Path, split: str, num_images: int, image_size: int, seed: int, rng: np.random.Generator
) -> None:
    """Write ``out/<split>/*.png`` and ``out/annotations/<split>.json``."""
    (out / split).mkdir(parents=True)
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id in range(1, num_images + 1):
        pixels, instances = _render_image(rng, image_size)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(out / split / file_name)
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for inst in instances:
            annotations.append(_annotation(inst, image_id, len(annotations) + 1))
    dataset = {
        "info": {
            "description": f"synthetic shapes, split {split}",
            "image_size": image_size,
            "seed": seed,
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "shape"}
            for i, name in enumerate(CLASSES, start=1)
        ],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"{split}.json").write_text(json.dumps(dataset))


def _is_complete(root: Path) -> bool:
    return all((root / "annotations" / f"{split}.json").is_file() for split in SPLITS)


def generate_shapes(
    root: str | Path,
    num_train: int = 800,
    num_val: int = 100,
    image_size: int = 160,
    seed: int = 0,
) -> None:
    """Generate the dataset into ``root``; does nothing if ``root`` already holds a complete one.

    Writes into a temporary sibling folder and renames it into place, so ``root`` is either absent
    (or empty) or complete. Same arguments give byte-identical json files.
    """
    root = Path(root)
    if _is_complete(root):
        return
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists, is not empty and holds no complete shapes dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val), strict=True)):
            # One generator per split: val does not change when num_train does.
            rng = np.random.default_rng([seed, index])
            _write_split(tmp, split, count, image_size, seed, rng)
        try:
            tmp.rename(root)  # POSIX rename also replaces an empty directory
        except OSError:
            # Another process (e.g. another rank) finished the same dataset first: keep theirs.
            if not _is_complete(root):
                raise
    finally:
        rmtree(tmp, ignore_errors=True)


def ensure_shapes(root: str | Path, **kwargs) -> None:
    """Generate the dataset (``kwargs`` as for :func:`generate_shapes`) if it is missing."""
    if not (Path(root) / "annotations" / "train.json").is_file():
        generate_shapes(root, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """CLI: generate into OUT and print a one-line summary."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.shapes",
        description="Generate the synthetic 'shapes' COCO instance-segmentation dataset.",
    )
    parser.add_argument("out", type=Path, help="dataset root to create")
    parser.add_argument("--num-train", type=int, default=800)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate_shapes(args.out, args.num_train, args.num_val, args.image_size, args.seed)
    parts = []
    for split in SPLITS:
        dataset = json.loads((args.out / "annotations" / f"{split}.json").read_text())
        parts.append(
            f"{split} {len(dataset['images'])} images / {len(dataset['annotations'])} instances"
        )
    print(f"shapes in {args.out}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
