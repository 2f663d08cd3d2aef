"""Instance segmentations in COCO form (polygons or RLE): compact storage, checks, decoding.

A segmentation is either a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixels, or an
RLE dict ``{"size": [height, width], "counts": str | list[int]}`` (compressed or not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
from pycocotools import mask as mask_utils


class RLE(msgspec.Struct):
    size: list[int]
    counts: str | list[int]


# How the COCO reader decodes a segmentation: each polygon stays raw JSON text.
RawSegmentation = list[msgspec.Raw] | RLE | None

_POLYGON = msgspec.json.Decoder(list[float])
_RLE = msgspec.json.Decoder(RLE)
# Bytes a JSON array of numbers may contain.
_NUMERIC = np.zeros(256, bool)
_NUMERIC[np.frombuffer(b"0123456789.-+eE,[] \t\r\n", np.uint8)] = True
# Polygon bytes checked at a time (bounds the temporary arrays of the checks).
_CHUNK = 1 << 25


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
        on images of these sizes [R]: position in ``sources`` -> message. Polygons are checked
        on their text, vectorized."""
        bad = self._polygon_problems()
        kinds = self.kinds[sources]
        out: dict[int, str] = {}
        for position in np.flatnonzero(kinds == 0):
            out[int(position)] = "no segmentation, while other annotations have one"
        empty = self.first_polygon[sources + 1] == self.first_polygon[sources]
        for position in np.flatnonzero((kinds == 1) & empty):
            out[int(position)] = "segmentation has no polygon"
        if bad:
            first_bad = np.array(sorted(bad), np.int64)
            # The first bad polygon of each annotation, if any.
            at = np.searchsorted(first_bad, self.first_polygon[sources])
            has = (at < len(first_bad)) & (kinds == 1)
            has[has] = first_bad[at[has]] < self.first_polygon[sources[has] + 1]
            for position in np.flatnonzero(has):
                out[int(position)] = bad[int(first_bad[at[position]])]
        for position in np.flatnonzero(kinds == 2):
            rle = self[int(sources[position])]
            size = [int(heights[position]), int(widths[position])]
            if rle["size"] != size:
                out[int(position)] = f"RLE size {rle['size']} differs from the image's {size}"
        return out

    def _polygon_problems(self) -> dict[int, str]:
        """Polygon index -> what is wrong with it, from its text: not a JSON array of numbers,
        fewer than 3 points, or an odd number of coordinates."""
        offsets, data = self.polygons.offsets, self.polygons.data
        out: dict[int, str] = {}
        start = 0
        while start < len(offsets) - 1:
            # Polygons start..stop-1 span about _CHUNK bytes.
            stop = int(np.searchsorted(offsets, offsets[start] + _CHUNK, side="right"))
            stop = min(max(stop, start + 1), len(offsets) - 1)
            chunk = data[offsets[start] : offsets[stop]]
            starts = offsets[start:stop] - offsets[start]
            commas = np.add.reduceat((chunk == ord(",")).view(np.uint8), starts, dtype=np.int64)
            foreign = np.add.reduceat((~_NUMERIC[chunk]).view(np.uint8), starts, dtype=np.int64)
            opens = chunk[starts] == ord("[")
            coordinates = commas + 1
            for i in np.flatnonzero(~opens | (foreign > 0)):
                out[start + int(i)] = (
                    "segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...] "
                    "of numbers"
                )
            for i in np.flatnonzero(opens & (foreign == 0) & (coordinates < 6)):
                out[start + int(i)] = (
                    f"polygon with {coordinates[i] // 2} points (at least 3 needed)"
                )
            odd = opens & (foreign == 0) & (coordinates >= 6) & (coordinates % 2 == 1)
            for i in np.flatnonzero(odd):
                out[start + int(i)] = (
                    f"polygon with an odd number of coordinates ({coordinates[i]})"
                )
            start = stop
        return out


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """What is wrong with one annotation's segmentation for an image of this size, or None.

    ``segm`` as decoded from JSON or a Hugging Face dataset (None: no segmentation)."""
    if segm is None:
        return "no segmentation, while other annotations have one"
    if isinstance(segm, dict):
        if set(segm) != {"size", "counts"} or segm["counts"] is None:
            return "RLE segmentation must be {size: [height, width], counts: ...}"
        if list(segm["size"]) != [height, width]:
            return f"RLE size {list(segm['size'])} differs from the image's [{height}, {width}]"
        return None
    if not isinstance(segm, list | tuple) or not all(isinstance(p, list | tuple) for p in segm):
        return "segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...] of numbers"
    if not segm:
        return "segmentation has no polygon"
    for polygon in segm:
        if len(polygon) < 6:
            return f"polygon with {len(polygon) // 2} points (at least 3 needed)"
        if len(polygon) % 2:
            return f"polygon with an odd number of coordinates ({len(polygon)})"
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
