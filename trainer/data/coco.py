"""COCO-format instance segmentation datasets.

The annotation file is parsed with msgspec into typed records that hold only the fields used,
then moved into flat numpy arrays; polygons stay JSON text until a sample needs its masks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from omegaconf import DictConfig

from trainer.data.annotations import Annotations, boxes_array
from trainer.data.base import DetectionDataset
from trainer.data.image_file import read_image
from trainer.data.segmentation import RawSegmentation, Segmentations


class _Image(msgspec.Struct):
    id: int
    file_name: str
    width: int
    height: int


class _Annotation(msgspec.Struct):
    id: int
    image_id: int
    category_id: int
    bbox: list[float]
    iscrowd: int = 0
    area: float | None = None
    segmentation: RawSegmentation = None


class _Category(msgspec.Struct):
    id: int
    name: str


class _CocoFile(msgspec.Struct):
    images: list[_Image]
    categories: list[_Category]
    annotations: list[_Annotation] = []


class _Ids(msgspec.Struct):
    id: Any = None
    image_id: Any = None


class _IdLists(msgspec.Struct):
    images: list[_Ids] = []
    annotations: list[_Ids] = []


def _ids_at(buffer: bytes, message: str) -> str:
    """' (annotation 5 of image 3)' for an error at ``$.annotations[i]...`` (or an image's),
    read leniently from the file; '' when the ids cannot be read."""
    match = re.search(r"`\$\.(images|annotations)\[(\d+)\]", message)
    if match is None:
        return ""
    try:
        items = getattr(msgspec.json.decode(buffer, type=_IdLists), match[1])
        item = items[int(match[2])]
    except (msgspec.DecodeError, IndexError):
        return ""
    if match[1] == "images":
        return f" (image {item.id})" if item.id is not None else ""
    return f" (annotation {item.id} of image {item.image_id})" if item.id is not None else ""


def _decode_error(path: Path, buffer: bytes, exc: msgspec.DecodeError) -> ValueError:
    message = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        return ValueError(
            f"annotation file '{path}' is not in COCO format: {message}{_ids_at(buffer, message)}."
        )
    where, hint = "", ""
    if "(byte " in message:
        offset = int(message.rsplit("(byte ", 1)[1].rstrip(")"))
        line = buffer.count(b"\n", 0, offset) + 1
        column = offset - (buffer.rfind(b"\n", 0, offset) + 1) + 1
        where = f" at line {line}, column {column}"
        if buffer[offset : offset + 3] in (b"NaN", b"Inf"):  # what Python's json writes
            hint = " (NaN and Infinity are not JSON numbers)"
    return ValueError(f"annotation file '{path}' is not valid JSON{where}: {message}{hint}.")


def read_coco_json(path: str | Path) -> tuple[Annotations, Segmentations]:
    """A COCO instances file -> its annotations (``ann_source``: position in the file's
    annotation list) and segmentations. Annotations without ``area`` get their box's area."""
    path = Path(path)
    buffer = path.read_bytes()
    try:
        doc = msgspec.json.decode(buffer, type=_CocoFile)
    except msgspec.DecodeError as exc:  # also ValidationError, its subclass
        raise _decode_error(path, buffer, exc) from None
    del buffer
    categories: dict[int, str] = {}
    for cat in doc.categories:
        if cat.id in categories:
            raise ValueError(
                f"annotation file '{path}': category id {cat.id} is used twice "
                f"('{categories[cat.id]}', '{cat.name}'); category ids must be unique."
            )
        categories[cat.id] = cat.name
    images, anns = doc.images, doc.annotations
    n, m = len(images), len(anns)
    boxes = boxes_array([a.bbox for a in anns], m)
    areas = np.fromiter((np.nan if a.area is None else a.area for a in anns), np.float64, m)
    missing = np.isnan(areas)
    areas[missing] = boxes[missing, 2] * boxes[missing, 3]
    table = Annotations(
        image_ids=np.fromiter((im.id for im in images), np.int64, n),
        file_names=np.array([im.file_name for im in images], dtype=str),
        heights=np.fromiter((im.height for im in images), np.int64, n),
        widths=np.fromiter((im.width for im in images), np.int64, n),
        image_source=np.arange(n),
        ann_ids=np.fromiter((a.id for a in anns), np.int64, m),
        ann_image_ids=np.fromiter((a.image_id for a in anns), np.int64, m),
        category_ids=np.fromiter((a.category_id for a in anns), np.int64, m),
        boxes=boxes,
        areas=areas,
        iscrowd=np.fromiter((a.iscrowd for a in anns), bool, m),
        ann_source=np.arange(m),
        categories=categories,
    )
    return table, Segmentations([a.segmentation for a in anns])


class CocoDataset(DetectionDataset):
    """A COCO json file (``ann_file``) and its image folder (``img_dir``); see
    :class:`~trainer.data.base.DetectionDataset` for items. A file whose annotations carry
    no segmentation gives a boxes-only dataset (targets without ``masks``)."""

    def __init__(
        self,
        ann_file: str,
        img_dir: str,
        transforms=None,
        filter_empty: bool = False,
        *,
        on_bad_annotation: str = "error",
        check_images: bool = True,
    ):
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file '{self.ann_file}' does not exist.")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder '{self.img_dir}' does not exist.")
        table, self._segms = read_coco_json(self.ann_file)
        self.has_masks = bool(self._segms.present.any())
        super().__init__(
            table, str(self.ann_file), transforms, filter_empty, on_bad_annotation, check_images
        )

    @classmethod
    def from_config(cls, cfg: DictConfig, train: bool = True) -> CocoDataset:
        """``data.train`` / ``data.val`` node -> dataset with its transforms (training ones
        when ``train``)."""
        split = "train" if train else "val"
        for key in ("ann_file", "img_dir"):
            if not Path(cfg[key]).exists():
                raise ValueError(
                    f"{key} '{cfg[key]}' does not exist. Put the COCO-format data there or "
                    f"point the recipe at it, e.g. data.{split}.{key}=PATH "
                    "(COCO 2017: data/coco/annotations/instances_train2017.json and "
                    "data/coco/train2017/, from https://cocodataset.org/#download)."
                )
        return cls(cfg.ann_file, cfg.img_dir, **cls.options_from_config(cfg, train))

    def _read_image(self, image: int) -> torch.Tensor:
        return read_image(self.img_dir / str(self.annotations.file_names[image]))

    def _image_file(self, table: Annotations, image: int) -> Path:
        return self.img_dir / str(table.file_names[image])

    def _file_problems(self, table: Annotations) -> dict[int, str]:
        # Judged on the name alone: links inside img_dir (a folder of links into storage) are
        # the user's own choice, and resolving 100k paths would touch the storage for each.
        out = {}
        for image, name in enumerate(table.file_names.tolist()):
            if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] in ("..", "."):
                out[image] = (
                    f"file_name '{name}' is not a path inside the image folder "
                    f"'{self.img_dir}' (img_dir)"
                )
        return out

    def _segmentations(self, rows: np.ndarray) -> list:
        return [self._segms[j] for j in self.annotations.ann_source[rows]]

    def _segmentation_problems(self, table: Annotations) -> dict[int, str]:
        image = table.ann_image.clip(min=0)
        return self._segms.problems(table.ann_source, table.heights[image], table.widths[image])


# Where recipes/demo.yaml keeps the demo set, relative to the working directory.
DEMO_ROOT = Path("data/shapes")


class ShapesDataset(CocoDataset):
    """The synthetic demo set, generated on first use when ``ann_file`` and ``img_dir`` are
    the demo recipe's own (``data/shapes/annotations/train.json`` and ``data/shapes/train``,
    or val). Any other files are read as plain COCO: the demo recipe with a user's paths
    trains on the user's data, and nothing is written beside it."""

    def __init__(
        self, ann_file: str, img_dir: str, transforms=None, filter_empty: bool = False, **kwargs
    ):
        generate_if_demo(ann_file, img_dir)
        super().__init__(ann_file, img_dir, transforms, filter_empty, **kwargs)

    @classmethod
    def from_config(cls, cfg: DictConfig, train: bool = True) -> ShapesDataset:
        """As :meth:`CocoDataset.from_config`, generating the demo files first when missing."""
        generate_if_demo(cfg.ann_file, cfg.img_dir)
        return super().from_config(cfg, train)


def generate_if_demo(ann_file: str | Path, img_dir: str | Path) -> None:
    """Generate the demo set into ``data/shapes/`` when ``ann_file`` and ``img_dir`` are a
    split of its layout there; any other paths are left alone."""
    # Imported here: `python -m trainer.data.shapes` runs that module as __main__, and an
    # import of it by this package first would make runpy warn.
    from trainer.data.shapes import SPLITS, ensure_shapes

    paths = (Path(ann_file).resolve(), Path(img_dir).resolve())
    root = DEMO_ROOT.resolve()
    if paths not in [(root / "annotations" / f"{s}.json", root / s) for s in SPLITS]:
        return
    try:
        ensure_shapes(DEMO_ROOT)
    except FileExistsError:
        # A folder of other files where the demo set goes: say so in one line.
        raise FileNotFoundError(
            f"{DEMO_ROOT / 'annotations' / 'train.json'} does not exist and {DEMO_ROOT} holds "
            "other files, so the demo set is not generated there; empty that folder, or "
            "point data.train / data.val at your own COCO files."
        ) from None
