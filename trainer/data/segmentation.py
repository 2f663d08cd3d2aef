"""Instance segmentations in COCO form (polygons or RLE): compact storage, checks, decoding.

A segmentation is either a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixels, or an
RLE dict ``{"size": [height, width], "counts": str | list[int]}`` (compressed or not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np
from pycocotools import mask as mask_utils


class RLE(msgspec.Struct):
    size: list[int]
    counts: str | list[int]


# How the COCO reader decodes a segmentation: each polygon stays raw JSON text.
RawSegmentation = list[msgspec.Raw] | RLE | None

# Points one object's polygons may have together. The most detailed real outlines have a few
# thousand; a damaged or wrongly generated file can hold millions, which take gigabytes once
# decoded and drawn. Counted on the file's text, before any number is decoded.
MAX_OBJECT_POINTS = 100_000
# How far past the border polygon points may lie, as a fraction of the image's width (for x)
# or height (for y), plus a pixel for rounding. Annotation tools let points stray a little
# outside, and the mask is cut at the border when drawn (as by pycocotools' annToMask);
# further out, the coordinates are of another image size or unit (normalised, rotated).
POLYGON_MARGIN = 0.1
# Boundary length (the longer of its x and y extent, per edge, summed over an object's
# polygons) allowed per pixel of the image's width + height. pycocotools draws a polygon
# from points every 1/5 pixel along its boundary, about 120 bytes each, so this bounds the
# memory an object takes to draw (12 kB per pixel of width + height); no real outline
# crosses its image 100 times.
MAX_BOUNDARY_FACTOR = 100

_POLYGON = msgspec.json.Decoder(list[float])
_RLE = msgspec.json.Decoder(RLE)
# Bytes a JSON array of numbers may contain.
_NUMERIC = np.zeros(256, bool)
_NUMERIC[np.frombuffer(b"0123456789.-+eE,[] \t\r\n", np.uint8)] = True
# Per byte, what _byte_counts adds up: commas in the low 32 bits; above, 1 per bracket and 3
# per byte a number array cannot hold.
_COUNTED = np.where(_NUMERIC, 0, 3 << 32).astype(np.int64)
_COUNTED[ord(",")] = 1
_COUNTED[ord("[")] = _COUNTED[ord("]")] = 1 << 32
# Polygons' text laid end to end as one list: "[1, 2][3, 4]" -> " 1, 2, 3, 4,".
_JOINED = np.arange(256, dtype=np.uint8)
_JOINED[ord("[")], _JOINED[ord("]")] = ord(" "), ord(",")
# Untyped, with floats read by Python: a literal beyond float64 (1e999) becomes inf, where
# the typed decoder refuses it.
_ANY_NUMBERS = msgspec.json.Decoder(float_hook=float)
# Polygon bytes scanned or parsed at a time: bounds the temporary arrays of the checks.
_WINDOW = 1 << 20
_NOT_NUMBERS = "segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...] of numbers"


class _Blob:
    """Byte strings stored one after another in a single numpy array."""

    def __init__(self, items: Sequence[bytes | msgspec.Raw]):
        lengths = np.fromiter(map(len, items), np.int64, len(items))
        self.offsets = np.zeros(len(items) + 1, np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(items), np.uint8)

    def __getitem__(self, index: int) -> bytes:
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()


class Segmentations:
    """Segmentations of M annotations, kept as JSON text and decoded one at a time.

    COCO's 860k training polygons as Python lists of floats take gigabytes and get copied into
    every DataLoader worker that reads them; as text in numpy arrays they take about their size
    in the file and stay shared between forked workers. Each polygon is stored separately, so
    checks run on the text without decoding it.
    """

    def __init__(self, values: Sequence[list[msgspec.Raw] | RLE | None]):
        m = len(values)
        self.kinds = np.zeros(m, np.uint8)  # 0 none, 1 polygons, 2 RLE
        polygon_counts = np.zeros(m, np.int64)
        self.rle_index = np.full(m, -1, np.int64)
        polygons: list[msgspec.Raw] = []
        rles: list[bytes] = []
        for j, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, list):
                self.kinds[j] = 1
                polygon_counts[j] = len(value)
                polygons.extend(value)
            else:
                self.kinds[j] = 2
                self.rle_index[j] = len(rles)
                rles.append(msgspec.json.encode(value))
        # Annotation j owns polygons first_polygon[j]:first_polygon[j + 1].
        self.first_polygon = np.zeros(m + 1, np.int64)
        np.cumsum(polygon_counts, out=self.first_polygon[1:])
        self.polygons = _Blob(polygons)
        self.rles = _Blob(rles)

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def present(self) -> np.ndarray:
        """bool [M]: whether each annotation has a segmentation."""
        return self.kinds > 0

    def __getitem__(self, index: int) -> list[list[float]] | dict | None:
        kind = self.kinds[index]
        if kind == 1:
            first, last = self.first_polygon[index], self.first_polygon[index + 1]
            return [_POLYGON.decode(self.polygons[p]) for p in range(first, last)]
        if kind == 2:
            rle = _RLE.decode(self.rles[self.rle_index[index]])
            return {"size": rle.size, "counts": rle.counts}
        return None

    def problems(
        self, sources: np.ndarray, heights: np.ndarray, widths: np.ndarray
    ) -> dict[int, str]:
        """What is wrong with the segmentations of annotations ``sources`` [R] (indices here)
        on images of these sizes [R]: position in ``sources`` -> message.

        Polygons are checked on their text first (form, point counts), vectorized; only those
        that pass are parsed, a window at a time, for their placement on the image."""
        kinds = self.kinds[sources]
        out: dict[int, str] = {}
        for position in np.flatnonzero(kinds == 0):
            out[int(position)] = "no segmentation, while other annotations have one"
        empty = self.first_polygon[sources + 1] == self.first_polygon[sources]
        for position in np.flatnonzero((kinds == 1) & empty):
            out[int(position)] = "segmentation has no polygon"
        for position in np.flatnonzero(kinds == 2):
            rle = self[int(sources[position])]
            problem = rle_problem(rle["size"], rle["counts"], heights[position], widths[position])
            if problem is not None:
                out[int(position)] = problem
        polygon_sources = (kinds == 1) & ~empty
        if polygon_sources.any():
            positions = np.flatnonzero(polygon_sources)
            for position, problem in self._polygon_problems(
                sources[positions], heights[positions], widths[positions]
            ).items():
                out[int(positions[position])] = problem
        return out

    def _byte_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """[P] each: commas in each polygon's text, and its brackets plus 3 for each byte no
        number array has (2: exactly one pair of brackets and nothing foreign). One pass,
        a window at a time."""
        offsets, data = self.polygons.offsets, self.polygons.data
        before = np.zeros((2, len(offsets)), np.int64)  # counts before each offset
        carry = np.zeros((2, 1), np.int64)
        for low in range(0, len(data), _WINDOW):
            high = min(low + _WINDOW, len(data))
            running = _COUNTED[data[low:high]]
            np.cumsum(running, out=running)  # both counts at once, 32 bits each
            first, last = np.searchsorted(offsets, [low, high], side="right")
            at = running[offsets[first:last] - low - 1]
            before[:, first:last] = carry + np.stack([at & 0xFFFFFFFF, at >> 32])
            carry += np.array([[running[-1] & 0xFFFFFFFF], [running[-1] >> 32]])
        commas, structure = np.diff(before, axis=1)
        return commas, structure

    def _polygon_shapes(self) -> _Shapes:
        """What the checks need of every stored polygon, independent of image sizes."""
        offsets, data = self.polygons.offsets, self.polygons.data
        count = len(offsets) - 1
        commas, structure = self._byte_counts()
        coordinates = commas + 1
        code = np.zeros(count, np.int64)  # 0: fine; else the first failing check below
        # Each polygon's text is valid JSON (msgspec checked it), so it has a first byte.
        code[(data[offsets[:-1]] != ord("[")) | (structure != 2)] = 1
        code[(code == 0) & (coordinates < 6)] = 2
        code[(code == 0) & (coordinates % 2 == 1)] = 3
        owner = np.repeat(np.arange(len(self)), np.diff(self.first_polygon))
        points = np.bincount(owner, coordinates // 2, minlength=len(self)).astype(np.int64)
        form_bad = np.bincount(owner, code > 0, minlength=len(self)) > 0
        parse = ~(form_bad | (points > MAX_OBJECT_POINTS))[owner]
        finite = np.zeros(count, bool)
        extent = np.zeros((count, 4))
        boundary = np.zeros(count)
        lengths = np.diff(offsets)
        for group in _windows(np.flatnonzero(parse), lengths):
            values = self._parse(group, coordinates[group])
            finite[group], extent[group], boundary[group] = _shape(values, coordinates[group])
        return _Shapes(code, coordinates, points, parse, finite, extent, boundary)

    def _polygon_problems(
        self, sources: np.ndarray, heights: np.ndarray, widths: np.ndarray
    ) -> dict[int, str]:
        """Problems of the polygons of annotations ``sources`` [R] (each with at least one):
        position -> message for the first problem of each annotation."""
        shapes = self._polygon_shapes()
        first, stop = self.first_polygon[sources], self.first_polygon[sources + 1]
        counts = stop - first
        # Polygon q of these annotations: its index in the store, and its annotation.
        owner = np.repeat(np.arange(len(sources)), counts)
        index = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
        index += np.repeat(first, counts)
        code, coordinates = shapes.code[index], shapes.coordinates[index]
        out: dict[int, str] = {}
        for q in np.flatnonzero(code > 0):
            out.setdefault(
                int(owner[q]),
                _NOT_NUMBERS
                if code[q] == 1
                else f"polygon with {coordinates[q] // 2} points (at least 3 needed)"
                if code[q] == 2
                else f"polygon with an odd number of coordinates ({coordinates[q]})",
            )
        points = shapes.points[sources]
        for position in np.flatnonzero(points > MAX_OBJECT_POINTS):
            out.setdefault(int(position), _too_many_points(int(points[position])))

        parsed = shapes.parsed[index]
        height, width = heights[owner], widths[owner]
        placement = _placement(shapes.finite[index], shapes.extent[index], height, width)
        for q in np.flatnonzero(parsed & (placement > 0)):
            out.setdefault(
                int(owner[q]),
                _placement_message(
                    int(placement[q]), shapes.extent[index[q]], int(height[q]), int(width[q])
                ),
            )
        boundary = np.bincount(owner, shapes.boundary[index], minlength=len(sources))
        for position in np.flatnonzero(boundary > MAX_BOUNDARY_FACTOR * (heights + widths)):
            out.setdefault(
                int(position),
                _boundary_message(
                    float(boundary[position]), int(heights[position]), int(widths[position])
                ),
            )
        return out

    def _parse(self, polygons: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
        """The numbers of these polygons (well-formed text, in store order), end to end."""
        offsets, data = self.polygons.offsets, self.polygons.data
        if polygons[-1] - polygons[0] + 1 == len(polygons):  # a run: one slice
            text = data[offsets[polygons[0]] : offsets[polygons[-1] + 1]]
        else:
            starts, lengths = offsets[polygons], offsets[polygons + 1] - offsets[polygons]
            at = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
            text = data[at + np.arange(int(lengths.sum()))]
        text = b"[" + _JOINED[text].tobytes().rstrip().removesuffix(b",") + b"]"
        try:
            values = np.array(_POLYGON.decode(text), np.float64)
        except msgspec.ValidationError:  # a number beyond float64
            values = np.array([_float(v) for v in _ANY_NUMBERS.decode(text)], np.float64)
        if len(values) != int(coordinates.sum()):
            raise RuntimeError(
                f"read {len(values)} polygon coordinates where the text has "
                f"{int(coordinates.sum())}"
            )
        return values


class _Shapes(NamedTuple):
    """Stored polygons [P] (``points``: per annotation [M]), as the checks see them."""

    code: np.ndarray  # 0 fine, 1 not a list of numbers, 2 under 3 points, 3 odd coordinates
    coordinates: np.ndarray
    points: np.ndarray
    parsed: np.ndarray  # whether its numbers were read (not for annotations with problems)
    finite: np.ndarray
    extent: np.ndarray  # [P, 4] x0, y0, x1, y1
    boundary: np.ndarray


def _float(value: float | int) -> float:
    """A JSON number as float64; integers beyond its range become inf, as floats do."""
    try:
        return float(value)
    except OverflowError:
        return math.copysign(math.inf, value)


def _windows(polygons: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """``polygons`` in groups of about ``_WINDOW`` bytes of text (a longer one alone)."""
    if len(polygons) == 0:
        return []
    ends = np.cumsum(lengths[polygons])
    cuts = np.searchsorted(ends, np.arange(_WINDOW, int(ends[-1]), _WINDOW), side="right")
    return [g for g in np.split(polygons, np.unique(cuts)) if len(g)]


def _too_many_points(points: int) -> str:
    return f"{points} polygon points, over the limit of {MAX_OBJECT_POINTS} per object"


def _shape(values: np.ndarray, coordinates: np.ndarray) -> tuple[np.ndarray, ...]:
    """Polygons with ``coordinates`` [P] (even) numbers each, end to end in ``values`` ->
    (all finite [P], extent [P, 4] x0, y0, x1, y1, boundary length [P]: per edge the longer
    of its x and y extent, which is what drawing it costs; 0 where not finite)."""
    x, y = values[0::2], values[1::2]
    sizes = coordinates // 2
    starts = np.cumsum(sizes) - sizes
    finite = np.logical_and.reduceat(np.isfinite(x) & np.isfinite(y), starts)
    extent = np.stack(
        [
            np.minimum.reduceat(x, starts),
            np.minimum.reduceat(y, starts),
            np.maximum.reduceat(x, starts),
            np.maximum.reduceat(y, starts),
        ],
        axis=1,
    )
    # Each point's successor along its closed outline.
    following = np.arange(1, len(x) + 1)
    following[starts + sizes - 1] = starts
    with np.errstate(invalid="ignore"):  # inf - inf, where not finite anyway
        edges = np.maximum(np.abs(x[following] - x), np.abs(y[following] - y))
    boundary = np.add.reduceat(edges, starts)
    return finite, extent, np.where(finite, boundary, 0.0)


def _placement(
    finite: np.ndarray, extent: np.ndarray, heights: np.ndarray, widths: np.ndarray
) -> np.ndarray:
    """Polygons [P] on images of these sizes [P] -> 0 fine, 1 a coordinate not finite,
    2 further out than the margin, 3 wholly outside."""
    margin_x, margin_y = POLYGON_MARGIN * widths + 1, POLYGON_MARGIN * heights + 1
    with np.errstate(invalid="ignore"):  # NaN extents, where not finite anyway
        past = (extent[:, 0] < -margin_x) | (extent[:, 2] > widths + margin_x)
        past |= (extent[:, 1] < -margin_y) | (extent[:, 3] > heights + margin_y)
        outside = (extent[:, 2] < 0) | (extent[:, 0] > widths)
        outside |= (extent[:, 3] < 0) | (extent[:, 1] > heights)
    return np.select([~finite, past, outside], [1, 2, 3], 0)


def _placement_message(code: int, extent: np.ndarray, height: int, width: int) -> str:
    if code == 1:
        return "polygon coordinate that is not a finite number (inf or NaN)"
    span = f"polygon spans x {extent[0]:g} to {extent[2]:g}, y {extent[1]:g} to {extent[3]:g}"
    if code == 2:
        return (
            f"{span}: further outside the {width}x{height} image than {POLYGON_MARGIN:.0%} of "
            "its size"
        )
    return f"{span}: wholly outside the {width}x{height} image"


def _boundary_message(boundary: float, height: int, width: int) -> str:
    return (
        f"polygon boundary {boundary:.0f} pixels long, over {MAX_BOUNDARY_FACTOR} times the "
        f"{width}x{height} image's width + height"
    )


def _compressed_runs(counts: str | bytes) -> np.ndarray | None:
    """COCO's compressed RLE text -> its run lengths, as pycocotools' rleFrString reads them
    (each count in 5-bit groups, from the fourth on relative to the one two before); None
    when the text is not such (pycocotools reads past the end of a truncated one)."""
    raw = counts.encode() if isinstance(counts, str) else bytes(counts)
    chars = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if len(chars) == 0:
        return np.zeros(0, np.int64)
    if ((chars < 0) | (chars > 63)).any() or chars[-1] & 0x20:
        return None
    ends = np.flatnonzero((chars & 0x20) == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    groups = ends - starts + 1
    if groups.max() > 7:  # 35 bits: more than any count pycocotools holds (32 bits) needs
        return None
    shifts = 5 * (np.arange(len(chars)) - np.repeat(starts, groups))
    values = np.add.reduceat((chars & 0x1F) << shifts, starts)
    negative = (chars[ends] & 0x10) > 0
    values[negative] -= np.left_shift(1, 5 * groups[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_problem(size: Any, counts: Any, height: int, width: int) -> str | None:
    """What is wrong with an RLE segmentation (``size``, ``counts`` compressed text or run
    lengths) for an image of this size, or None. Its runs must cover the image exactly:
    pycocotools fills a mask run by run without checking, past its end too."""
    height, width = int(height), int(width)
    if list(size) != [height, width]:
        return f"RLE size {list(size)} differs from the image's [{height}, {width}]"
    if isinstance(counts, str | bytes):
        runs = _compressed_runs(counts)
        if runs is None:
            return "RLE counts are not COCO's compressed RLE text"
    elif not isinstance(counts, list | tuple):
        return "RLE counts must be compressed RLE text or a list of whole numbers"
    else:
        try:
            runs = np.asarray(counts) if len(counts) else np.zeros(0, np.int64)
        except (TypeError, ValueError, OverflowError):
            runs = np.zeros((0, 0))
        if runs.dtype.kind not in "iu" or runs.ndim != 1:
            return "RLE counts must be a list of whole numbers"
    if (runs < 0).any():
        return "RLE counts must not be negative"
    total = int(runs.astype(np.uint64).sum()) if (runs < 2**32).all() else None
    if total != height * width:
        covered = f"{total} pixels" if total is not None else "a count of 2^32 pixels or more"
        return f"RLE counts cover {covered}, not the {width}x{height} image's {height * width}"
    return None


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """What is wrong with one annotation's segmentation for an image of this size, or None.

    ``segm`` as decoded from JSON or a Hugging Face dataset (None: no segmentation); the
    same checks as :meth:`Segmentations.problems`."""
    if segm is None:
        return "no segmentation, while other annotations have one"
    if isinstance(segm, dict):
        if set(segm) != {"size", "counts"} or not isinstance(segm["size"], list | tuple):
            return "RLE segmentation must be {size: [height, width], counts: ...}"
        return rle_problem(segm["size"], segm["counts"], height, width)
    if not isinstance(segm, list | tuple) or not all(isinstance(p, list | tuple) for p in segm):
        return _NOT_NUMBERS
    if not segm:
        return "segmentation has no polygon"
    polygons = []
    for polygon in segm:
        try:
            numbers = np.asarray(polygon)
        except (TypeError, ValueError, OverflowError):  # ragged, or not numbers
            return _NOT_NUMBERS
        if numbers.ndim != 1 or numbers.dtype.kind not in "iuf":
            return _NOT_NUMBERS
        if len(numbers) < 6:
            return f"polygon with {len(numbers) // 2} points (at least 3 needed)"
        if len(numbers) % 2:
            return f"polygon with an odd number of coordinates ({len(numbers)})"
        polygons.append(numbers.astype(np.float64))
    coordinates = np.array([len(p) for p in polygons], np.int64)
    if coordinates.sum() // 2 > MAX_OBJECT_POINTS:
        return _too_many_points(int(coordinates.sum() // 2))
    finite, extent, boundary = _shape(np.concatenate(polygons), coordinates)
    sizes = np.full(len(segm), height), np.full(len(segm), width)
    codes = _placement(finite, extent, *sizes)
    bad = np.flatnonzero(codes > 0)
    if len(bad):
        return _placement_message(int(codes[bad[0]]), extent[bad[0]], height, width)
    if boundary.sum() > MAX_BOUNDARY_FACTOR * (height + width):
        return _boundary_message(float(boundary.sum()), height, width)
    return None


def _to_rle(segm: list | dict, height: int, width: int) -> dict:
    if isinstance(segm, dict):
        if isinstance(segm["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segm, height, width)
        counts = segm["counts"]
        return {
            "size": segm["size"],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    # Several polygons form one instance: rasterise each, then take their union.
    return mask_utils.merge(mask_utils.frPyObjects([list(p) for p in segm], height, width))


def decode_masks(segms: Sequence[list | dict], height: int, width: int) -> np.ndarray:
    """Segmentations of one image -> uint8 masks [N, height, width] (as ``COCO.annToMask``)."""
    if not segms:
        return np.zeros((0, height, width), np.uint8)
    masks = mask_utils.decode([_to_rle(s, height, width) for s in segms])  # [H, W, N]
    return np.ascontiguousarray(masks.transpose(2, 0, 1))
