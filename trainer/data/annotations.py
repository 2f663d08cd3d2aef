"""A dataset's images and instance annotations as flat numpy arrays.

Held as one Python dict per instance (pycocotools' ``COCO``), COCO's 860k training instances
take gigabytes, and every DataLoader worker that reads them copies the memory pages they live
on (reading a Python object writes its reference count). One numpy array per field takes a
fraction of that and stays shared, unchanged, between forked workers. Segmentations are not
held here: each dataset keeps them in its own storage, addressed by ``ann_source``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass
class Annotations:
    """Images [N] and annotations [M].

    On construction, images are sorted by id and annotations grouped by image: image ``i``
    owns rows ``ann_start[i]:ann_start[i + 1]``. ``ann_image`` [M] is each annotation's image
    index, -1 when its ``ann_image_ids`` names no image (only before validation drops it);
    with repeated image ids, annotations go to the first image of that id.
    """

    image_ids: np.ndarray  # int64 [N]
    file_names: np.ndarray  # str [N], for messages (COCO: relative to the image folder)
    heights: np.ndarray  # int64 [N], as the annotations state
    widths: np.ndarray  # int64 [N]
    image_source: np.ndarray  # int64 [N], position in the source (HF: row)
    ann_ids: np.ndarray  # int64 [M]
    ann_image_ids: np.ndarray  # int64 [M]
    category_ids: np.ndarray  # int64 [M]
    boxes: np.ndarray  # float64 [M, 4] xywh pixels; NaN where the source's box is malformed
    areas: np.ndarray  # float64 [M]
    iscrowd: np.ndarray  # bool [M]
    ann_source: np.ndarray  # int64 [M], where the segmentation lives in the source
    categories: dict[int, str]  # category id -> name, by id
    ann_image: np.ndarray = field(init=False)
    ann_start: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        order = np.argsort(self.image_ids, kind="stable")
        for name in ("image_ids", "file_names", "heights", "widths", "image_source"):
            setattr(self, name, getattr(self, name)[order])
        unique, first = np.unique(self.image_ids, return_index=True)
        ann_image = np.full(len(self.ann_ids), -1, np.int64)
        if len(unique):
            pos = np.searchsorted(unique, self.ann_image_ids).clip(max=len(unique) - 1)
            found = unique[pos] == self.ann_image_ids
            ann_image[found] = first[pos[found]]
        order = np.argsort(ann_image, kind="stable")
        for name in _ANNOTATION_FIELDS:
            setattr(self, name, getattr(self, name)[order])
        self.ann_image = ann_image[order]
        self.ann_start = np.searchsorted(self.ann_image, np.arange(len(self.image_ids) + 1))
        self.categories = dict(sorted(self.categories.items()))

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_annotations(self) -> int:
        return len(self.ann_ids)

    def rows(self, image: int) -> slice:
        """Annotation rows of image index ``image``."""
        return slice(int(self.ann_start[image]), int(self.ann_start[image + 1]))

    def subset(self, keep_images: np.ndarray, keep_annotations: np.ndarray) -> Annotations:
        """The images where ``keep_images`` [N] and the annotations of those where
        ``keep_annotations`` [M]; annotations of no image are dropped."""
        on_kept_image = self.ann_image >= 0
        on_kept_image[on_kept_image] = keep_images[self.ann_image[on_kept_image]]
        keep_annotations = keep_annotations & on_kept_image
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for name in _IMAGE_FIELDS:
            values[name] = values[name][keep_images]
        for name in _ANNOTATION_FIELDS:
            values[name] = values[name][keep_annotations]
        return Annotations(**values)

    def to_coco_dict(self, segmentations: Sequence[Any] | None = None) -> dict:
        """COCO json content (images, annotations, categories), e.g. for a pycocotools
        ground truth; ``segmentations`` [M] adds each annotation's segmentation."""
        images = [
            {"id": int(i), "file_name": str(f), "height": int(h), "width": int(w)}
            for i, f, h, w in zip(self.image_ids, self.file_names, self.heights, self.widths)
        ]
        annotations = []
        for row in range(self.num_annotations):
            ann = {
                "id": int(self.ann_ids[row]),
                "image_id": int(self.ann_image_ids[row]),
                "category_id": int(self.category_ids[row]),
                "bbox": self.boxes[row].tolist(),
                "area": float(self.areas[row]),
                "iscrowd": int(self.iscrowd[row]),
            }
            if segmentations is not None:
                ann["segmentation"] = segmentations[row]
            annotations.append(ann)
        categories = [{"id": i, "name": name} for i, name in self.categories.items()]
        return {"images": images, "annotations": annotations, "categories": categories}


_IMAGE_FIELDS = ("image_ids", "file_names", "heights", "widths", "image_source")
_ANNOTATION_FIELDS = (
    "ann_ids",
    "ann_image_ids",
    "category_ids",
    "boxes",
    "areas",
    "iscrowd",
    "ann_source",
)


def boxes_array(boxes: list, count: int) -> np.ndarray:
    """Boxes as read from a file (lists that should hold 4 numbers) -> float64 [count, 4];
    a row is NaN where its box does not have 4 numbers."""
    lengths = np.fromiter(
        (len(b) if isinstance(b, list | tuple) else 0 for b in boxes), np.int64, count
    )
    if (lengths == 4).all():
        return np.array(boxes, np.float64).reshape(count, 4)
    out = np.full((count, 4), np.nan)
    good = np.flatnonzero(lengths == 4)
    if len(good):
        out[good] = np.array([boxes[i] for i in good], np.float64)
    return out
