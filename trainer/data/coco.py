"""COCO-format instance segmentation datasets read with pycocotools."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from trainer.data.shapes import ensure_shapes


class CocoDataset(Dataset):
    """Images and instance annotations of a COCO json file.

    Category ids map to contiguous labels 1..K in id order (``cat_to_label``,
    ``label_to_cat``); ``CLASSES`` holds their names. Crowd regions are left out of the
    targets. Item: (image uint8 [3, H, W], target) with target ``boxes`` [N, 4] xyxy float,
    ``labels`` [N] int64, ``masks`` [N, H, W] uint8, ``image_id`` int, ``orig_size``
    (height, width) of the file.
    """

    def __init__(self, ann_file: str, img_dir: str, transforms=None, filter_empty: bool = False):
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file '{self.ann_file}' does not exist.")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder '{self.img_dir}' does not exist.")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(self.ann_file))
        cat_ids = sorted(self.coco.getCatIds())
        self.CLASSES = tuple(self.coco.cats[c]["name"] for c in cat_ids)
        self.cat_to_label = {cat: i + 1 for i, cat in enumerate(cat_ids)}
        self.label_to_cat = {label: cat for cat, label in self.cat_to_label.items()}
        self.ids = sorted(self.coco.imgs)
        if filter_empty:
            self.ids = [i for i in self.ids if self._usable_annotations(i)]
        self.transforms = transforms

    def _usable_annotations(self, image_id: int) -> list[dict]:
        return [
            a
            for a in self.coco.imgToAnns[image_id]
            if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
        ]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = decode_image(str(self.img_dir / info["file_name"]), mode=ImageReadMode.RGB)
        height, width = image.shape[-2:]
        anns = self._usable_annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        if anns:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns]),
            "masks": tv_tensors.Mask(masks),
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target = {
            "boxes": target["boxes"].as_subclass(torch.Tensor),
            "labels": target["labels"].reshape(-1).long(),
            "masks": target["masks"].as_subclass(torch.Tensor),
            "image_id": image_id,
            "orig_size": (int(info["height"]), int(info["width"])),
        }
        return image.as_subclass(torch.Tensor), target


class ShapesDataset(CocoDataset):
    """The embedded synthetic demo set; generated on first use under the annotation
    file's grandparent folder (``data/shapes/annotations/train.json`` -> ``data/shapes``)."""

    def __init__(self, ann_file: str, img_dir: str, transforms=None, filter_empty: bool = False):
        ensure_shapes(Path(ann_file).parent.parent)
        super().__init__(ann_file, img_dir, transforms, filter_empty)
