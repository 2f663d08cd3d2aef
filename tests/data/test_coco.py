"""CocoDataset against pycocotools' own reading of the same files."""

import contextlib
import io
import json
import pickle
import random

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from trainer.data.coco import CocoDataset
from trainer.evaluation.coco import CocoEvaluator


def reference(ann_file) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def expected_target(coco: COCO, image_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Boxes xyxy, labels and masks of the non-crowd annotations, as pycocotools reads them."""
    anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    info = coco.imgs[image_id]
    masks = (
        np.stack([coco.annToMask(a) for a in anns])
        if anns
        else np.zeros((0, info["height"], info["width"]))
    )
    return boxes, labels, masks


def test_items_match_pycocotools(shapes):
    ann_file = shapes / "annotations" / "train.json"
    dataset = CocoDataset(ann_file, shapes / "train")
    coco = reference(ann_file)
    assert dataset.CLASSES == ("circle", "square", "triangle")
    assert dataset.has_masks and dataset.iou_types == ("bbox", "segm")
    assert len(dataset) == len(coco.imgs)
    for index, image_id in enumerate(sorted(coco.imgs)):
        image, target = dataset[index]
        info = coco.imgs[image_id]
        assert image.dtype == torch.uint8 and image.shape == (3, info["height"], info["width"])
        assert target["image_id"] == image_id
        assert target["orig_size"] == (info["height"], info["width"])
        boxes, labels, masks = expected_target(coco, image_id)
        torch.testing.assert_close(target["boxes"], boxes)
        assert torch.equal(target["labels"], labels)  # category ids 1..3 are labels 1..3
        assert target["masks"].dtype == torch.uint8
        assert np.array_equal(target["masks"].numpy(), masks)


def test_ground_truth_is_the_file(shapes):
    ann_file = shapes / "annotations" / "val.json"
    gt = CocoDataset(ann_file, shapes / "val").coco
    coco = reference(ann_file)
    assert gt.imgs.keys() == coco.imgs.keys()
    for image_id, info in coco.imgs.items():
        assert gt.imgs[image_id] == info
    assert gt.anns == coco.anns
    assert gt.cats.keys() == coco.cats.keys()


def test_order_in_the_file_does_not_matter(coco_copy):
    data, write = coco_copy
    ordered = CocoDataset(*write(data))
    shuffled = dict(data, images=data["images"][::-1], annotations=list(data["annotations"]))
    random.Random(0).shuffle(shuffled["annotations"])
    again = CocoDataset(*write(shuffled))
    for index in range(len(ordered)):
        (image_a, a), (image_b, b) = ordered[index], again[index]
        assert torch.equal(image_a, image_b) and a["image_id"] == b["image_id"]
        # Within an image, annotations keep their order in the file.
        order = sorted(range(len(a["labels"])), key=lambda k: a["boxes"][k].tolist())
        order_b = sorted(range(len(b["labels"])), key=lambda k: b["boxes"][k].tolist())
        assert torch.equal(a["boxes"][order], b["boxes"][order_b])
        assert torch.equal(a["masks"][order], b["masks"][order_b])


def test_crowd_and_tiny_boxes_are_left_out_and_empty_images_filtered(coco_copy):
    data, write = coco_copy
    first_image = data["images"][0]["id"]
    for ann in data["annotations"]:
        if ann["image_id"] == first_image:
            ann["iscrowd"] = 1
    tiny = next(a for a in data["annotations"] if a["image_id"] != first_image)
    tiny["bbox"][2] = 0.5
    files = write(data)
    kept = CocoDataset(*files)
    assert len(kept) == len(data["images"])
    assert len(kept[0][1]["boxes"]) == 0 and kept[0][1]["masks"].shape[0] == 0
    filtered = CocoDataset(*files, filter_empty=True)
    assert len(filtered) == len(data["images"]) - 1
    assert first_image not in [filtered[i][1]["image_id"] for i in range(len(filtered))]
    index = sorted(im["id"] for im in data["images"]).index(tiny["image_id"])
    expected = sum(1 for a in data["annotations"] if a["image_id"] == tiny["image_id"]) - 1
    assert len(kept[index][1]["labels"]) == expected
    # The ground truth keeps crowd regions: COCOeval ignores detections on them.
    assert sum(a["iscrowd"] for a in kept.coco.anns.values()) >= 1


def test_category_ids_need_not_be_contiguous(coco_copy):
    data, write = coco_copy
    new_id = {1: 3, 2: 7, 3: 10}
    for cat in data["categories"]:
        cat["id"] = new_id[cat["id"]]
    for ann in data["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    dataset = CocoDataset(*write(data))
    assert dataset.cat_to_label == {3: 1, 7: 2, 10: 3}
    assert dataset.label_to_cat == {1: 3, 2: 7, 3: 10}
    first = min(data["images"], key=lambda im: im["id"])["id"]
    label = {3: 1, 7: 2, 10: 3}
    expected = [label[a["category_id"]] for a in data["annotations"] if a["image_id"] == first]
    assert dataset[0][1]["labels"].tolist() == expected


def test_boxes_only_file_has_no_masks_and_scores_bbox(coco_copy):
    data, write = coco_copy
    for ann in data["annotations"]:
        del ann["segmentation"]
    dataset = CocoDataset(*write(data))
    assert not dataset.has_masks and dataset.iou_types == ("bbox",)
    image, target = dataset[0]
    assert set(target) == {"boxes", "labels", "image_id", "orig_size"}
    assert all("segmentation" not in a for a in dataset.coco.anns.values())
    # The evaluator scores the ground truth itself, as detections, at AP 1.
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_cat, iou_types=dataset.iou_types)
    for index in range(len(dataset)):
        _, target = dataset[index]
        scores = torch.ones(len(target["labels"]))
        evaluator.process([target["image_id"]], [dict(target, scores=scores)])
    assert evaluator.evaluate()["bbox/AP"] == pytest.approx(1.0)


def test_pickled_copy_leaves_the_ground_truth_behind(shapes):
    dataset = CocoDataset(shapes / "annotations" / "val.json", shapes / "val")
    assert dataset.coco is not None
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._coco is None and copy.skipped_images == 0
    assert torch.equal(copy[1][0], dataset[1][0])
    assert torch.equal(copy[1][1]["masks"], dataset[1][1]["masks"])


def test_annotations_are_numpy_arrays(shapes):
    """No per-instance Python objects: loader workers share the arrays unchanged."""
    dataset = CocoDataset(shapes / "annotations" / "train.json", shapes / "train")
    table = dataset.annotations
    for name in ("image_ids", "heights", "ann_ids", "boxes", "category_ids", "ann_start"):
        assert isinstance(getattr(table, name), np.ndarray), name
    segms = dataset._segms
    assert isinstance(segms.polygons.data, np.ndarray) and isinstance(segms.rles.data, np.ndarray)
    data = json.loads((shapes / "annotations" / "train.json").read_text())
    rows = sorted(range(len(data["annotations"])), key=lambda k: data["annotations"][k]["image_id"])
    assert [segms[int(j)] for j in table.ann_source] == [
        data["annotations"][k]["segmentation"] for k in rows
    ]
