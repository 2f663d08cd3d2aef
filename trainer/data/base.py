"""What the detection datasets share: compact annotations checked before training, masks decoded
per sample, a lazily built COCO ground truth, and recovery from images that fail to load.

A subclass reads its source into :class:`~trainer.data.annotations.Annotations`, sets
``has_masks``, and implements the ``_read_image``, ``_image_file``, ``_segmentations`` and
``_segmentation_problems`` hooks (and ``_file_problems`` where images are named by paths).
``_read_image`` decodes with :func:`~trainer.data.image_file.read_image`, the reader that
evaluation and prediction share.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pycocotools.coco import COCO
from torch.utils.data import Dataset, get_worker_info
from torchvision import tv_tensors

from trainer.data.annotations import Annotations
from trainer.data.checks import POLICIES, apply_policy, find_problems
from trainer.data.segmentation import decode_masks
from trainer.data.transforms import transforms_from_config

logger = logging.getLogger("trainer")

# Images in a row that may fail to load before the dataset gives up (storage gone, not one
# damaged file).
MAX_FAILURES_IN_A_ROW = 50
# Slots of the shared failure counter: the main process and loader workers each count in
# their own, so no increment is lost to another process's.
_COUNTER_SLOTS = 256


class DetectionDataset(Dataset):
    """Images and instance annotations.

    Category ids map to contiguous labels 1..K in id order (``cat_to_label``,
    ``label_to_cat``); ``CLASSES`` holds their names. Crowd regions and boxes under one pixel
    wide or high are left out of the targets. Item: (image uint8 [3, H, W], target) with target
    ``boxes`` [N, 4] xyxy float32, ``labels`` [N] int64, ``masks`` [N, H, W] uint8 (only when
    the dataset has segmentations: ``has_masks``), ``image_id`` int and ``orig_size``
    (height, width) of the file.

    An image that fails to load during training is replaced by the next one of the same
    orientation, with a warning; ``skipped_images`` counts them over all loader workers.
    """

    has_masks: bool

    def __init__(
        self,
        table: Annotations,
        source: str,
        transforms=None,
        filter_empty: bool = False,
        on_bad_annotation: str = "error",
        check_images: bool = True,
    ):
        if on_bad_annotation not in POLICIES:
            raise ValueError(
                f"on_bad_annotation must be one of {list(POLICIES)}, got {on_bad_annotation!r}."
            )
        if table.num_images == 0:
            raise ValueError(f"{source} has no images: the dataset is empty.")
        self.source = source
        found = find_problems(
            table,
            self._segmentation_problems(table) if self.has_masks else None,
            (lambda i: self._image_file(table, i)) if check_images else None,
            self._file_problems(table),
        )
        table = apply_policy(table, found, on_bad_annotation, source, logger)
        if table.num_images == 0:
            raise ValueError(f"{source}: no image is left after skipping the bad ones.")
        self.annotations = table
        self.CLASSES = tuple(table.categories.values())
        cat_ids = np.array(list(table.categories), np.int64)
        self.cat_to_label = {int(c): i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {label: cat for cat, label in self.cat_to_label.items()}
        self._labels = np.searchsorted(cat_ids, table.category_ids) + 1
        self._usable = ~table.iscrowd & (table.boxes[:, 2] >= 1) & (table.boxes[:, 3] >= 1)
        keep = np.ones(table.num_images, bool)
        if filter_empty:
            keep = np.bincount(table.ann_image[self._usable], minlength=table.num_images) > 0
            if not keep.any():
                raise ValueError(
                    f"{source}: no image has a usable annotation (not crowd, box at least "
                    "1 pixel wide and high)."
                )
        # Dataset index -> image index of the table.
        self.indices = np.flatnonzero(keep)
        self.transforms = transforms
        # In shared memory (travels to loader workers under fork and spawn alike).
        self._skipped = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        self._coco: COCO | None = None

    @staticmethod
    def options_from_config(cfg: DictConfig, train: bool) -> dict[str, Any]:
        """The arguments every dataset takes, from its node (``data.train`` / ``data.val``):
        ``transforms``, ``filter_empty`` (training only), ``on_bad_annotation`` and
        ``check_images``. For the ``from_config`` of subclasses."""
        return {
            "transforms": transforms_from_config(cfg, train),
            "filter_empty": cfg.filter_empty and train,
            # Unresolvable when this node is used outside a recipe (no data.on_bad_annotation).
            "on_bad_annotation": OmegaConf.select(
                cfg, "on_bad_annotation", default="error", throw_on_resolution_failure=False
            )
            or "error",
            "check_images": cfg.check_images,
        }

    # Hooks for subclasses.

    def _read_image(self, image: int) -> torch.Tensor:
        """Image index of ``self.annotations`` -> uint8 RGB [3, H, W]; raises when the file
        cannot be read or decoded."""
        raise NotImplementedError

    def _image_file(self, table: Annotations, image: int) -> Any:
        """A path or binary file object of image ``image`` of ``table``, for header checks."""
        raise NotImplementedError

    def _segmentations(self, rows: np.ndarray) -> list:
        """Segmentations (polygons or RLE dicts) of these annotation rows."""
        raise NotImplementedError

    def _file_problems(self, table: Annotations) -> dict[int, str]:
        """Image index -> what is wrong with its file name (those files are never opened)."""
        return {}

    def _segmentation_problems(self, table: Annotations) -> dict[int, str]:
        """Annotation row -> what is wrong with its segmentation."""
        raise NotImplementedError

    # Dataset protocol.

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        table = self.annotations
        for _ in range(MAX_FAILURES_IN_A_ROW):
            image_index = int(self.indices[index])
            size = (int(table.heights[image_index]), int(table.widths[image_index]))
            try:
                image = self._read_image(image_index)
                if tuple(image.shape[-2:]) != size:
                    raise ValueError(
                        f"decoded size {tuple(image.shape[-2:])} differs from the annotated "
                        f"(height, width) {size}"
                    )
            except (OSError, RuntimeError, ValueError) as exc:
                self._count_skip(image_index, exc)
                index = self._substitute(index)
                continue
            return self._sample(image_index, image)
        raise RuntimeError(
            f"{self.source}: {MAX_FAILURES_IN_A_ROW} images in a row could not be read (the "
            f"last: {table.file_names[image_index]}); is the image storage reachable?"
        )

    def _sample(self, image_index: int, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        table = self.annotations
        height, width = image.shape[-2:]
        span = table.rows(image_index)
        rows = np.arange(span.start, span.stop)[self._usable[span]]
        xywh = table.boxes[rows]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        # Boxes may reach a little past the border (validation allows rounding).
        boxes = boxes.clip(0, [width, height, width, height]).astype(np.float32)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(self._labels[rows]),
        }
        if self.has_masks:
            masks = decode_masks(self._segmentations(rows), height, width)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        out = {
            "boxes": target["boxes"].as_subclass(torch.Tensor),
            "labels": target["labels"].reshape(-1).long(),
            "image_id": int(table.image_ids[image_index]),
            "orig_size": (int(height), int(width)),
        }
        if self.has_masks:
            out["masks"] = target["masks"].as_subclass(torch.Tensor)
        return image.as_subclass(torch.Tensor), out

    # Unreadable images met during training.

    @property
    def skipped_images(self) -> int:
        """Images that failed to load so far, in this process and its loader workers."""
        return int(self._skipped.sum())

    def _count_skip(self, image_index: int, exc: Exception) -> None:
        worker = get_worker_info()
        self._skipped[0 if worker is None else 1 + worker.id % (_COUNTER_SLOTS - 1)] += 1
        count = self.skipped_images
        logger.warning(
            "%s: skipped image %s (id %d), which could not be loaded: %s (%d skipped so far)",
            self.source,
            self.annotations.file_names[image_index],
            self.annotations.image_ids[image_index],
            exc,
            count,
        )

    def _substitute(self, index: int) -> int:
        """The next index with the same orientation (keeps aspect-ratio batches uniform)."""
        groups = self.aspect_groups
        same = np.flatnonzero(groups == groups[index])
        if len(same) < 2:
            same = np.arange(len(self))
        return int(same[np.searchsorted(same, index, side="right") % len(same)])

    # Shape and evaluation metadata.

    @property
    def aspect_groups(self) -> np.ndarray:
        """int64 [len(self)]: 1 for landscape images (wider than high), else 0."""
        table = self.annotations
        return (table.widths[self.indices] > table.heights[self.indices]).astype(np.int64)

    @property
    def iou_types(self) -> tuple[str, ...]:
        """What COCO evaluation can score on this dataset: bbox, and segm with masks."""
        return ("bbox", "segm") if self.has_masks else ("bbox",)

    @property
    def coco(self) -> COCO:
        """pycocotools ground truth of every image and annotation (crowd ones included), for
        the evaluator; built on first use and never sent to loader workers."""
        if self._coco is None:
            table = self.annotations
            segmentations = None
            if self.has_masks:
                segmentations = self._segmentations(np.arange(table.num_annotations))
            coco = COCO()
            coco.dataset = table.to_coco_dict(segmentations)
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_coco"] = None  # loader workers do not need the ground truth
        return state
