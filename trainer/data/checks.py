"""Problems found in annotation files and image headers before training, and what to do
about them.

Annotation checks run on the flat arrays of :class:`~trainer.data.annotations.Annotations`
(vectorized); image checks read only each file's header (~30 us per image), for its size as
displayed, after its EXIF orientation, as annotations are drawn.
``on_bad_annotation="error"`` stops with one ValueError listing the problems;
``"skip"`` leaves out the bad annotations and images and logs how many.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data.annotations import Annotations
from trainer.data.image_file import SIDEWAYS, image_header

POLICIES = ("error", "skip")
MAX_LISTED = 20
# Pixels a box may reach past the image border (rounding in annotation tools).
BOX_TOLERANCE = 1.0
# Longest image side: pycocotools draws polygons at 5x in 32-bit integers, and a stated size
# bounds how far out polygon points may lie. Far above any photo, scan or aerial tile.
MAX_IMAGE_SIDE = 1 << 24
# Threads reading image headers: they wait on storage (network file systems), not on the CPU.
HEADER_THREADS = 8


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data. ``kind`` is short and shared by similar problems (for
    counts); ``detail`` says what exactly is wrong."""

    kind: str
    detail: str
    file: str = ""
    image_id: int | None = None
    ann_id: int | None = None

    def __str__(self) -> str:
        ids = [f"image {self.image_id}"] if self.image_id is not None else []
        ids += [f"annotation {self.ann_id}"] if self.ann_id is not None else []
        where = f"{self.file} ({', '.join(ids)})" if self.file else ", ".join(ids)
        return f"{where}: {self.detail}" if where else self.detail


@dataclass
class Findings:
    problems: list[Problem]
    bad_images: np.ndarray  # bool [N]
    bad_annotations: np.ndarray  # bool [M]


def find_problems(
    table: Annotations,
    segmentation_problems: dict[int, str] | None = None,
    open_image: Callable[[int], Any] | None = None,
    file_problems: dict[int, str] | None = None,
) -> Findings:
    """Problems of ``table``. Each annotation or image is reported once, for the first check
    it fails.

    ``segmentation_problems`` maps annotation rows to what is wrong with their segmentation;
    ``file_problems`` image indices to what is wrong with their file name (such files are
    never opened); ``open_image(i)`` gives image ``i``'s path or binary file object, for
    header checks (missing, unreadable, size different from the annotations); None skips
    them.
    """
    found = Findings([], np.zeros(table.num_images, bool), np.zeros(table.num_annotations, bool))

    def image_problem(index: np.ndarray, kind: str, detail: Callable[[int], str]) -> None:
        for i in np.flatnonzero(index & ~found.bad_images):
            found.bad_images[i] = True
            found.problems.append(
                Problem(kind, detail(i), str(table.file_names[i]), int(table.image_ids[i]))
            )

    def annotation_problem(index: np.ndarray, kind: str, detail: Callable[[int], str]) -> None:
        for row in np.flatnonzero(index & ~found.bad_annotations):
            found.bad_annotations[row] = True
            image = table.ann_image[row]
            file = str(table.file_names[image]) if image >= 0 else ""
            image_id, ann_id = int(table.ann_image_ids[row]), int(table.ann_ids[row])
            found.problems.append(Problem(kind, detail(row), file, image_id, ann_id))

    ids, heights, widths = table.image_ids, table.heights, table.widths
    repeated = np.zeros(table.num_images, bool)
    repeated[1:] = ids[1:] == ids[:-1]  # images are sorted by id: the later copies
    image_problem(repeated, "duplicate image id", lambda i: f"image id {ids[i]} is used again")
    image_problem(
        (heights <= 0) | (widths <= 0),
        "non-positive image size",
        lambda i: (
            "cannot read the image to find its size"
            if widths[i] < 0
            else f"image size {widths[i]}x{heights[i]} (width x height) is not positive"
        ),
    )
    image_problem(
        (heights > MAX_IMAGE_SIDE) | (widths > MAX_IMAGE_SIDE),
        "image too large",
        lambda i: (
            f"image size {widths[i]}x{heights[i]} (width x height) has a side over "
            f"{MAX_IMAGE_SIDE} pixels"
        ),
    )
    if file_problems:
        at = np.zeros(table.num_images, bool)
        at[list(file_problems)] = True
        image_problem(at, "file outside the image folder", file_problems.__getitem__)

    ann_ids = table.ann_ids
    order = np.argsort(ann_ids, kind="stable")
    repeated = np.zeros(table.num_annotations, bool)
    repeated[order[1:]] = ann_ids[order[1:]] == ann_ids[order[:-1]]
    annotation_problem(
        repeated, "duplicate annotation id", lambda r: f"annotation id {ann_ids[r]} is used again"
    )
    annotation_problem(
        table.ann_image < 0,
        "unknown image id",
        lambda r: f"image_id {table.ann_image_ids[r]} names no image of the file",
    )
    cats = table.category_ids
    known = ", ".join(map(str, table.categories))
    annotation_problem(
        ~np.isin(cats, list(table.categories)),
        "unknown category id",
        lambda r: f"category_id {cats[r]} is not among the categories ({known})",
    )
    boxes = table.boxes
    annotation_problem(
        ~np.isfinite(boxes).all(1),
        "malformed box",
        lambda r: (
            "bbox must be 4 numbers [x, y, width, height]"
            if np.isnan(boxes[r]).all()  # how a box of the wrong shape is read
            else f"bbox {_box(boxes[r])} has a coordinate that is not a finite number"
        ),
    )
    annotation_problem(
        (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0),
        "box with non-positive size",
        lambda r: f"bbox {_box(boxes[r])} has non-positive width or height",
    )
    image = table.ann_image.clip(min=0)
    height, width = heights[image], widths[image]
    outside = (boxes[:, :2] < -BOX_TOLERANCE).any(1)
    outside |= boxes[:, 0] + boxes[:, 2] > width + BOX_TOLERANCE
    outside |= boxes[:, 1] + boxes[:, 3] > height + BOX_TOLERANCE
    outside &= ~found.bad_images[image]  # an image without a usable size goes whole
    annotation_problem(
        outside,
        "box outside the image",
        lambda r: f"bbox {_box(boxes[r])} [x, y, w, h] leaves the {width[r]}x{height[r]} image",
    )
    if segmentation_problems:
        rows = np.zeros(table.num_annotations, bool)
        rows[list(segmentation_problems)] = True
        rows &= ~found.bad_images[image]  # judged against a size that is not known
        annotation_problem(rows, "bad segmentation", segmentation_problems.__getitem__)

    if open_image is not None:
        by_kind: dict[str, dict[int, str]] = {}
        unchecked = np.flatnonzero(~found.bad_images)
        for kind, detail, index in _image_header_problems(open_image, unchecked, heights, widths):
            by_kind.setdefault(kind, {})[index] = detail
        for kind, details in by_kind.items():
            at = np.zeros(table.num_images, bool)
            at[list(details)] = True
            image_problem(at, kind, details.__getitem__)
    return found


def _box(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _header_problem(source: Any, height: int, width: int) -> tuple[str, str] | None:
    try:
        header = image_header(source)
    except FileNotFoundError:
        return "missing image file", "image file not found"
    except Exception as exc:  # PIL raises several kinds for damaged or foreign files
        return "unreadable image file", f"cannot read the image: {exc}"
    if (header.height, header.width) != (height, width):
        turned = ""
        if header.orientation != 1:
            turned = f", as displayed: its EXIF orientation is {header.orientation}"
            if header.orientation in SIDEWAYS:
                turned += f" and it is stored {header.height}x{header.width}"
        return (
            "image size disagrees with the annotations",
            f"the image is {header.width}x{header.height} (width x height{turned}) but the "
            f"annotations say {width}x{height}",
        )
    return None


def _image_header_problems(
    open_image: Callable[[int], Any], images: np.ndarray, heights: np.ndarray, widths: np.ndarray
) -> list[tuple[str, str, int]]:
    def check(chunk: np.ndarray) -> list[tuple[str, str, int]]:
        out = []
        for i in chunk:
            try:
                source = open_image(int(i))
            except Exception as exc:
                out.append(("unreadable image file", f"cannot read the image: {exc}", int(i)))
                continue
            problem = _header_problem(source, int(heights[i]), int(widths[i]))
            if problem is not None:
                out.append((*problem, int(i)))
        return out

    chunks = np.array_split(images, max(1, len(images) // 512))
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        return [p for found in pool.map(check, chunks) for p in found]


def _counts(problems: list[Problem]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in Counter(p.kind for p in problems).items())


def apply_policy(
    table: Annotations, found: Findings, policy: str, source: str, logger: logging.Logger
) -> Annotations:
    """``table`` when nothing was found; with ``policy`` "skip" the table without the bad
    images and annotations (logged); with "error" a ValueError listing the problems."""
    if not found.problems:
        return table
    problems = found.problems
    if policy == "error":
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise ValueError(
            f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the "
            "annotations or images "
            f"({_counts(problems)}):\n{listed}{more}\n"
            "Fix the data, or set data.on_bad_annotation=skip to train without the bad "
            "annotations and images."
        )
    logger.warning(
        "%s: skipped %d annotations and %d images with problems (%s); first: %s",
        source,
        int(found.bad_annotations.sum()),
        int(found.bad_images.sum()),
        _counts(problems),
        problems[0],
    )
    return table.subset(~found.bad_images, ~found.bad_annotations)
