"""Hugging Face ``datasets`` detection data: ``type: HFDataset``.

The default schema is the common detection one::

    image     Image
    objects   {bbox: [[x, y, w, h], ...], category: [ClassLabel, ...],
               segmentation (optional): [polygons [[x1, y1, ...], ...] or RLE {size, counts}]}
              (a dict of lists, or a list of dicts)
    image_id, width, height (optional columns); objects.id, .area, .iscrowd (optional)

``columns`` renames any of these, e.g. ``{objects: annotations, category: label}``. The
ClassLabel's names become the classes (category id = class index); plain integer categories
are named by their value. Without a segmentation field the dataset is boxes-only: targets carry
no ``masks`` and evaluation scores bbox only. Boxes, categories and sizes are read column-wise
from Arrow into :class:`~trainer.data.annotations.Annotations`; images and segmentations are
read per sample from the memory-mapped dataset.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from omegaconf import DictConfig

from trainer.data.annotations import Annotations, boxes_array
from trainer.data.base import DetectionDataset
from trainer.data.image_file import image_header, read_image
from trainer.data.segmentation import segmentation_problem

DEFAULT_COLUMNS = {
    "image": "image",
    "objects": "objects",
    "bbox": "bbox",
    "category": "category",
    "segmentation": "segmentation",
    "image_id": "image_id",
    "width": "width",
    "height": "height",
    "id": "id",
    "area": "area",
    "iscrowd": "iscrowd",
}
BBOX_FORMATS = ("xywh", "xyxy")
_BATCH = 10_000


def load_hf_dataset(path: str, split: str) -> datasets.Dataset:
    """A ``save_to_disk`` folder (a Dataset, or a DatasetDict and its ``split``), or anything
    ``datasets.load_dataset`` reads (Hub name, local data folder)."""
    if Path(path, "dataset_dict.json").is_file() or Path(path, "dataset_info.json").is_file():
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as exc:  # a damaged or empty folder fails in many ways
            raise ValueError(
                f"cannot load Hugging Face dataset folder '{path}': {type(exc).__name__}: "
                f"{exc}. Write it again with save_to_disk."
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"Hugging Face dataset '{path}' has no split '{split}'; its splits: "
                    f"{list(loaded)}. Set data.train.split / data.val.split."
                )
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as exc:  # datasets raises many kinds (not found, offline, bad split)
        raise ValueError(
            f"cannot load Hugging Face dataset '{path}' split '{split}': {exc}. Use a Hub "
            "dataset name (with network access) or a folder written by save_to_disk."
        ) from None


def _inner(feature: Any) -> Any:
    """The element feature of a list feature (List, LargeList, Sequence), else itself."""
    return getattr(feature, "feature", feature)


class _Objects:
    """Per-object fields of one Arrow batch of the objects column, in either layout."""

    def __init__(self, column: pa.ChunkedArray, names: dict[str, str], where: str):
        array = column.combine_chunks()
        if pa.types.is_struct(array.type):  # a dict of per-image lists
            self.fields, self.counts = {}, None
            for key, name in names.items():
                if array.type.get_field_index(name) < 0:
                    continue
                values = pc.struct_field(array, name)
                counts = values.value_lengths().fill_null(0).to_numpy()
                if self.counts is not None and not np.array_equal(counts, self.counts):
                    raise ValueError(
                        f"{where}: objects.{name} has a different number of entries than the "
                        "other object fields in some rows."
                    )
                self.counts = counts
                self.fields[key] = values.flatten()
        else:  # a list of per-object dicts
            self.counts = array.value_lengths().fill_null(0).to_numpy()
            objects = array.flatten()
            self.fields = {
                key: pc.struct_field(objects, name)
                for key, name in names.items()
                if objects.type.get_field_index(name) >= 0
            }

    def numbers(self, key: str, dtype: type, default: float) -> np.ndarray:
        values = self.fields[key].fill_null(default)
        return values.to_numpy(zero_copy_only=False).astype(dtype)

    def boxes(self) -> np.ndarray:
        values = self.fields["bbox"]
        if pa.types.is_fixed_size_list(values.type) and values.type.list_size == 4:
            flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
            boxes = flat.reshape(-1, 4)
            if values.null_count:  # flatten() skips null boxes
                boxes = boxes_array(values.to_pylist(), len(values))
            return boxes
        return boxes_array(values.to_pylist(), len(values))


class HFDataset(DetectionDataset):
    """A split of a Hugging Face dataset; see :class:`~trainer.data.base.DetectionDataset`
    for items. ``path``: Hub name or save_to_disk folder; ``columns``: renames (see module)."""

    def __init__(
        self,
        path: str,
        split: str = "train",
        transforms=None,
        filter_empty: bool = False,
        *,
        columns: dict[str, str] | None = None,
        bbox_format: str = "xywh",
        on_bad_annotation: str = "error",
        check_images: bool = True,
    ):
        unknown = set(columns or {}) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError(
                f"unknown column role(s) {sorted(unknown)} in columns; valid: "
                f"{list(DEFAULT_COLUMNS)}."
            )
        if bbox_format not in BBOX_FORMATS:
            raise ValueError(
                f"bbox_format must be one of {list(BBOX_FORMATS)}, got {bbox_format!r}."
            )
        self.path, self.split = path, split
        self.columns = {**DEFAULT_COLUMNS, **(columns or {})}
        source = f"Hugging Face dataset '{path}' [{split}]"
        dataset = load_hf_dataset(path, split)
        if len(dataset) == 0:
            raise ValueError(f"{source} has no images: the dataset is empty.")
        image_col, objects_col = self.columns["image"], self.columns["objects"]
        for role, name in (("image", image_col), ("objects", objects_col)):
            if name not in dataset.column_names:
                raise ValueError(
                    f"{source} has no column '{name}' (the {role}); its columns: "
                    f"{dataset.column_names}. Map yours with columns: {{{role}: NAME}}."
                )
        if not isinstance(dataset.features[image_col], datasets.Image):
            raise ValueError(f"{source}: column '{image_col}' is not an Image feature.")
        # Undecoded: bytes are decoded here with torchvision, and headers read without decoding.
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))
        self._images = dataset.select_columns([image_col])
        self._objects = dataset.select_columns([objects_col])
        table = self._read_table(dataset, source, bbox_format)
        super().__init__(table, source, transforms, filter_empty, on_bad_annotation, check_images)

    @classmethod
    def from_config(cls, cfg: DictConfig, train: bool = True) -> HFDataset:
        """``data.train`` / ``data.val`` node -> dataset with its transforms; the split
        defaults to "train" for training, else "validation"."""
        return cls(
            cfg.path,
            cfg.split or ("train" if train else "validation"),
            columns=dict(cfg.columns),
            bbox_format=cfg.bbox_format,
            **cls.options_from_config(cfg, train),
        )

    def _object_feature(self, dataset: datasets.Dataset, role: str) -> Any:
        feature = dataset.features[self.columns["objects"]]
        fields = feature if isinstance(feature, dict) else _inner(feature)
        if not isinstance(fields, dict):
            return None
        return _inner(fields.get(self.columns[role]))

    def _read_table(self, dataset: datasets.Dataset, source: str, bbox_format: str) -> Annotations:
        names = {key: self.columns[key] for key in ("bbox", "category", "id", "area", "iscrowd")}
        label = self._object_feature(dataset, "category")
        for role in ("bbox", "category"):
            if self._object_feature(dataset, role) is None:
                raise ValueError(
                    f"{source}: column '{self.columns['objects']}' has no field "
                    f"'{self.columns[role]}' (the {role}). Map yours with "
                    f"columns: {{{role}: NAME}}."
                )
        self.has_masks = self._object_feature(dataset, "segmentation") is not None
        wanted = [self.columns["objects"]] + [
            self.columns[key]
            for key in ("image_id", "width", "height")
            if self.columns[key] in dataset.column_names
        ]
        parts: dict[str, list[np.ndarray]] = {}
        for batch in dataset.select_columns(wanted).with_format("arrow").iter(_BATCH):
            objects = _Objects(batch.column(self.columns["objects"]), names, source)
            m = int(objects.counts.sum())
            parts.setdefault("counts", []).append(objects.counts)
            parts.setdefault("boxes", []).append(objects.boxes())
            parts.setdefault("category", []).append(objects.numbers("category", np.int64, -1))
            for key, default, dtype in (
                ("id", -1, np.int64),
                ("area", np.nan, np.float64),
                ("iscrowd", 0, bool),
            ):
                values = (
                    objects.numbers(key, dtype, default)
                    if key in objects.fields
                    else np.full(m, default, dtype)
                )
                parts.setdefault(key, []).append(values)
            for key in ("image_id", "width", "height"):
                if self.columns[key] in batch.column_names:
                    values = batch.column(self.columns[key]).to_numpy().astype(np.int64)
                    parts.setdefault(key, []).append(values)
        arrays = {key: np.concatenate(values) for key, values in parts.items()}
        counts = arrays["counts"]
        rows = np.arange(len(counts))
        image_ids = arrays.get("image_id", rows)
        if len(np.unique(image_ids)) != len(image_ids):
            raise ValueError(
                f"{source}: column '{self.columns['image_id']}' repeats image ids; make them "
                "unique, or map image_id to a missing column name to number the rows instead."
            )
        if "width" in arrays and "height" in arrays:
            heights, widths = arrays["height"], arrays["width"]
        else:
            heights, widths = self._header_sizes()
        boxes = arrays["boxes"]
        if bbox_format == "xyxy":
            boxes = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        areas = arrays["area"]
        missing = np.isnan(areas)
        areas[missing] = boxes[missing, 2] * boxes[missing, 3]
        ann_ids = arrays["id"]
        if (ann_ids < 0).all():  # no id field: number the objects
            ann_ids = np.arange(1, len(ann_ids) + 1)
        # Object index within its row, where its segmentation is found.
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        if isinstance(label, datasets.ClassLabel):
            categories = dict(enumerate(label.names))
        else:
            categories = {int(c): str(c) for c in np.unique(arrays["category"]) if c >= 0}
        return Annotations(
            image_ids=image_ids,
            file_names=np.array([f"row {r}" for r in rows], dtype=str),
            heights=heights,
            widths=widths,
            image_source=rows,
            ann_ids=ann_ids,
            ann_image_ids=np.repeat(image_ids, counts),
            category_ids=arrays["category"],
            boxes=boxes,
            areas=areas,
            iscrowd=arrays["iscrowd"],
            ann_source=np.arange(len(ann_ids)) - starts,
            categories=categories,
        )

    def _header_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(heights, widths) [rows] from the image headers, as displayed; -1 where
        unreadable."""
        sizes = []
        for row in range(len(self._images)):
            try:
                sizes.append(image_header(self._file(row))[:2])
            except Exception:  # validation reports it
                sizes.append((-1, -1))
        array = np.array(sizes, np.int64).reshape(-1, 2)
        return array[:, 0], array[:, 1]

    def _file(self, row: int) -> Any:
        value = self._images[int(row)][self.columns["image"]]
        return io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"]

    def _read_image(self, image: int) -> torch.Tensor:
        return read_image(self._file(self.annotations.image_source[image]))

    def _image_file(self, table: Annotations, image: int) -> Any:
        return self._file(table.image_source[image])

    def _row_segmentations(self, row: int) -> list:
        objects = self._objects[int(row)][self.columns["objects"]]
        name = self.columns["segmentation"]
        if isinstance(objects, dict):
            return list(objects[name])
        return [obj[name] for obj in objects]

    def _segmentations(self, rows: np.ndarray) -> list:
        table = self.annotations
        images = table.ann_image[rows]
        order = np.argsort(images, kind="stable")
        out: list = [None] * len(rows)
        # One dataset row read per image.
        for group in np.split(order, np.flatnonzero(np.diff(images[order])) + 1):
            if len(group) == 0:
                continue
            row_segms = self._row_segmentations(table.image_source[images[group[0]]])
            for position in group:
                out[position] = row_segms[table.ann_source[rows[position]]]
        return out

    def _segmentation_problems(self, table: Annotations) -> dict[int, str]:
        problems = {}
        for image in range(table.num_images):
            span = table.rows(image)
            if span.start == span.stop:
                continue
            segms = self._row_segmentations(table.image_source[image])
            height, width = int(table.heights[image]), int(table.widths[image])
            for row in range(span.start, span.stop):
                problem = segmentation_problem(segms[table.ann_source[row]], height, width)
                if problem is not None:
                    problems[row] = problem
        return problems
