"""HFDataset on small datasets built here with `datasets` and saved to disk, checked against
CocoDataset reading the same annotations from COCO json."""

import contextlib
import io
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools.coco import COCO

from trainer.config import DataConfig, RecipeError
from trainer.data import build_dataset
from trainer.data.coco import CocoDataset
from trainer.data.hf import HFDataset
from trainer.evaluation.coco import CocoEvaluator

CLASSES = ["circle", "square", "triangle"]


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def rle(coco: COCO, ann: dict) -> dict:
    """The annotation's mask as compressed RLE with str counts."""
    encoded = coco.annToRLE(ann)
    counts = encoded["counts"]
    return {
        "size": list(encoded["size"]),
        "counts": counts if isinstance(counts, str) else counts.decode(),
    }


def hf_rows(shapes: Path, split: str, segmentation: str | None, coco_file: Path | None = None):
    """Rows of the shapes split in the detection schema; segmentation None, "rle" or
    "polygon" (polygon annotations only)."""
    coco = load_coco(coco_file or shapes / "annotations" / f"{split}.json")
    rows = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        anns = coco.imgToAnns[image_id]
        objects = {
            "bbox": [a["bbox"] for a in anns],
            "category": [a["category_id"] - 1 for a in anns],
            "id": [a["id"] for a in anns],
        }
        if segmentation == "rle":
            objects["segmentation"] = [rle(coco, a) for a in anns]
        elif segmentation == "polygon":
            objects["segmentation"] = [a["segmentation"] for a in anns]
        image = Image.open(shapes / split / info["file_name"])
        rows.append({"image": image, "image_id": image_id, "objects": objects})
    return rows


def objects_feature(segmentation: str | None) -> dict:
    fields = {
        "bbox": datasets.List(datasets.Value("float32"), length=4),
        "category": datasets.ClassLabel(names=CLASSES),
        "id": datasets.Value("int64"),
    }
    if segmentation == "rle":
        fields["segmentation"] = {
            "size": datasets.List(datasets.Value("int32")),
            "counts": datasets.Value("string"),
        }
    elif segmentation == "polygon":
        fields["segmentation"] = datasets.List(datasets.List(datasets.Value("float64")))
    return fields


def save(rows: list[dict], features: dict, path: Path, list_of_dicts: bool = False) -> Path:
    if list_of_dicts:  # [{bbox, category, ...}, ...] per image instead of {bbox: [...], ...}
        for row in rows:
            objects = row["objects"]
            row["objects"] = [dict(zip(objects, values)) for values in zip(*objects.values())]
        features = dict(features, objects=datasets.List(features["objects"]))
    else:
        features = dict(
            features, objects={k: datasets.List(v) for k, v in features["objects"].items()}
        )
    dataset = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    dataset.save_to_disk(str(path))
    return path


def base_features(segmentation: str | None) -> dict:
    return {
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "objects": objects_feature(segmentation),
    }


def assert_same_items(hf: HFDataset, coco: CocoDataset, masks: bool = True) -> None:
    assert len(hf) == len(coco)
    for index in range(len(hf)):
        (image_a, a), (image_b, b) = hf[index], coco[index]
        assert torch.equal(image_a, image_b)
        assert a["image_id"] == b["image_id"] and a["orig_size"] == b["orig_size"]
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert torch.equal(a["labels"], b["labels"])
        if masks:
            assert torch.equal(a["masks"], b["masks"])


def test_rle_dict_of_lists_matches_coco(shapes, tmp_path):
    path = save(hf_rows(shapes, "train", "rle"), base_features("rle"), tmp_path / "hf")
    hf = HFDataset(str(path), "train")
    assert hf.CLASSES == tuple(CLASSES) and hf.has_masks
    assert hf.iou_types == ("bbox", "segm")
    coco = CocoDataset(shapes / "annotations" / "train.json", shapes / "train")
    assert_same_items(hf, coco)
    assert hf.label_to_cat == {1: 0, 2: 1, 3: 2}  # category id = ClassLabel index
    gt = hf.coco
    assert sorted(gt.imgs) == sorted(coco.coco.imgs)
    assert {a["id"] for a in gt.anns.values()} == set(coco.coco.anns)


def test_polygons_list_of_dicts_numbered_rows_sizes_from_headers(shapes, tmp_path):
    data = json.loads((shapes / "annotations" / "val.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if isinstance(a["segmentation"], list)]
    coco_file = tmp_path / "polygons.json"
    coco_file.write_text(json.dumps(data))
    rows = hf_rows(shapes, "val", "polygon", coco_file)
    for row in rows:
        del row["image_id"]
    features = base_features("polygon")
    del features["image_id"]
    hf = HFDataset(str(save(rows, features, tmp_path / "hf", list_of_dicts=True)), "train")
    coco = CocoDataset(coco_file, shapes / "val")
    # Without an image_id column, rows are numbered from 0.
    for index in range(len(hf)):
        assert hf[index][1]["image_id"] == index
    assert hf.annotations.heights.tolist() == coco.annotations.heights.tolist()
    for index in range(len(hf)):
        (_, a), (_, b) = hf[index], coco[index]
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert torch.equal(a["masks"], b["masks"])


def test_boxes_only_dataset_has_no_masks_and_scores_bbox(shapes, tmp_path):
    path = save(hf_rows(shapes, "val", None), base_features(None), tmp_path / "hf")
    hf = HFDataset(str(path), "train")
    assert not hf.has_masks and hf.iou_types == ("bbox",)
    image, target = hf[0]
    assert set(target) == {"boxes", "labels", "image_id", "orig_size"}
    assert_same_items(hf, CocoDataset(shapes / "annotations" / "val.json", shapes / "val"), False)
    evaluator = CocoEvaluator(hf.coco, hf.label_to_cat, iou_types=hf.iou_types)
    for index in range(len(hf)):
        _, target = hf[index]
        evaluator.process(
            [target["image_id"]], [dict(target, scores=torch.ones(len(target["labels"])))]
        )
    metrics = evaluator.evaluate()
    assert metrics["bbox/AP"] == pytest.approx(1.0) and "segm/AP" not in metrics


def test_column_mapping_xyxy_boxes_and_splits(shapes, tmp_path):
    rows = []
    for row in hf_rows(shapes, "val", None):
        boxes = [[x, y, x + w, y + h] for x, y, w, h in row["objects"]["bbox"]]
        objects = {"box": boxes, "label": row["objects"]["category"]}
        rows.append({"picture": row["image"], "idx": row["image_id"], "annotations": objects})
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "idx": datasets.Value("int64"),
            "annotations": {
                "box": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "label": datasets.List(datasets.ClassLabel(names=CLASSES)),
            },
        }
    )
    split = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"validation": split}).save_to_disk(str(tmp_path / "hf"))
    cfg = OmegaConf.structured(DataConfig).val
    cfg.type = "HFDataset"
    cfg.path = str(tmp_path / "hf")
    cfg.min_size = [64]
    cfg.bbox_format = "xyxy"
    cfg.columns = {
        "image": "picture",
        "image_id": "idx",
        "objects": "annotations",
        "bbox": "box",
        "category": "label",
    }
    hf = build_dataset(cfg, train=False)  # split "validation" by default for data.val
    coco = CocoDataset(shapes / "annotations" / "val.json", shapes / "val")
    coco.transforms = hf.transforms
    assert_same_items(hf, coco, masks=False)
    with pytest.raises(RecipeError, match=r"no split 'train'; its splits: \['validation'\]"):
        build_dataset(cfg, train=True)


def test_missing_column_and_unknown_role(shapes, tmp_path):
    path = save(hf_rows(shapes, "val", None), base_features(None), tmp_path / "hf")
    with pytest.raises(
        ValueError,
        match=r"has no column 'annotations' \(the objects\); its "
        r"columns: \['image', 'image_id', 'objects'\]",
    ):
        HFDataset(str(path), columns={"objects": "annotations"})
    with pytest.raises(ValueError, match=r"has no field 'label' \(the category\)"):
        HFDataset(str(path), columns={"category": "label"})
    with pytest.raises(ValueError, match=r"unknown column role\(s\) \['boxes'\]"):
        HFDataset(str(path), columns={"boxes": "bbox"})
    with pytest.raises(ValueError, match="cannot load Hugging Face dataset"):
        HFDataset(str(tmp_path / "nowhere"))


def test_bad_rows_are_reported_then_skipped(shapes, tmp_path):
    rows = hf_rows(shapes, "val", "rle")
    rows[1]["objects"]["bbox"][0][3] = 0.0
    rows[2]["objects"]["segmentation"][0]["size"] = [5, 5]
    path = save(rows, base_features("rle"), tmp_path / "hf")
    with pytest.raises(ValueError) as error:
        HFDataset(str(path))
    message = str(error.value)
    first, second = rows[1]["objects"]["id"][0], rows[2]["objects"]["id"][0]
    assert f"row 1 (image {rows[1]['image_id']}, annotation {first}): bbox" in message
    assert f"row 2 (image {rows[2]['image_id']}, annotation {second}): RLE size [5, 5]" in message
    hf = HFDataset(str(path), on_bad_annotation="skip")
    total = sum(len(r["objects"]["bbox"]) for r in rows)
    assert hf.annotations.num_annotations == total - 2
    assert first not in hf.coco.anns and second not in hf.coco.anns


def test_unreadable_image_without_size_columns(shapes, tmp_path, caplog):
    rows = hf_rows(shapes, "val", None)
    rows[3]["image"] = {"bytes": b"not an image", "path": None}
    path = save(rows, base_features(None), tmp_path / "hf")
    with pytest.raises(ValueError, match=r"row 3 \(image \d+\): cannot read the image"):
        HFDataset(str(path))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert len(HFDataset(str(path), on_bad_annotation="skip")) == len(rows) - 1
    # Its annotations go with it, not reported against an unknown size.
    assert "and 1 images with problems (non-positive image size 1)" in caplog.text
    # datasets cannot read back an empty saved dataset: one error, not a traceback.
    datasets.load_from_disk(str(path)).select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot load Hugging Face dataset folder"):
        HFDataset(str(tmp_path / "empty"))
