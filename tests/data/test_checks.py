"""Bad input is found before training, listed in one error or skipped; bad images met during
training are skipped and counted."""

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.models.conftest import lean_model_config
from trainer.config import RecipeError, load_recipe
from trainer.data import DATASETS, build_dataloader, build_dataset, collate
from trainer.data.base import MAX_FAILURES_IN_A_ROW
from trainer.data.coco import CocoDataset
from trainer.models import build_detector


def first_annotation(data: dict) -> dict:
    return data["annotations"][0]


def polygon_annotation(data: dict) -> dict:
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], list))


def rle_annotation(data: dict) -> dict:
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))


def image_of(data: dict, ann: dict) -> dict:
    return next(im for im in data["images"] if im["id"] == ann["image_id"])


def zero_width(data):
    ann = first_annotation(data)
    ann["bbox"][2] = 0
    return ann, "box with non-positive size", "non-positive width or height"


def outside(data):
    ann = first_annotation(data)
    ann["bbox"][0] = image_of(data, ann)["width"] - 2
    return ann, "box outside the image", "leaves the"


def unknown_category(data):
    ann = first_annotation(data)
    ann["category_id"] = 99
    return ann, "unknown category id", "category_id 99 is not among the categories (1, 2, 3)"


def two_point_polygon(data):
    ann = polygon_annotation(data)
    ann["segmentation"] = [[1.0, 2.0, 5.0, 6.0]]
    return ann, "bad segmentation", "polygon with 2 points (at least 3 needed)"


def odd_polygon(data):
    ann = polygon_annotation(data)
    ann["segmentation"][0] = ann["segmentation"][0][:7]
    return ann, "bad segmentation", "odd number of coordinates (7)"


def flat_polygon(data):
    ann = polygon_annotation(data)
    ann["segmentation"] = ann["segmentation"][0]
    return ann, "bad segmentation", "must be a list of polygons"


def rle_of_another_size(data):
    ann = rle_annotation(data)
    ann["segmentation"]["size"] = [10, 10]
    return ann, "bad segmentation", "RLE size [10, 10] differs"


def missing_segmentation(data):
    ann = polygon_annotation(data)
    del ann["segmentation"]
    return ann, "bad segmentation", "no segmentation"


def duplicate_annotation_id(data):
    ann = data["annotations"][3]
    ann["id"] = data["annotations"][0]["id"]
    return ann, "duplicate annotation id", "is used again"


def unknown_image(data):
    ann = first_annotation(data)
    ann["image_id"] = 12345
    return ann, "unknown image id", "image_id 12345 names no image"


@pytest.mark.parametrize(
    "edit",
    [
        zero_width,
        outside,
        unknown_category,
        two_point_polygon,
        odd_polygon,
        flat_polygon,
        rle_of_another_size,
        missing_segmentation,
        duplicate_annotation_id,
        unknown_image,
    ],
)
def test_bad_annotation_is_reported_then_skipped(coco_copy, caplog, edit):
    data, write = coco_copy
    ann, kind, detail = edit(data)
    files = write(data)
    with pytest.raises(ValueError) as error:
        CocoDataset(*files)
    message = str(error.value)
    assert f"1 problem in the annotations or images ({kind} 1)" in message
    assert f"image {ann['image_id']}, annotation {ann['id']}" in message
    assert detail in message
    assert "data.on_bad_annotation=skip" in message
    if edit is not unknown_image:  # an annotation of no image has no file to name
        assert image_of(data, ann)["file_name"] in message

    with caplog.at_level(logging.WARNING, logger="trainer"):
        dataset = CocoDataset(*files, on_bad_annotation="skip")
    assert f"skipped 1 annotations and 0 images with problems ({kind} 1)" in caplog.text
    assert dataset.annotations.num_annotations == len(data["annotations"]) - 1
    assert ann["id"] not in dataset.coco.anns or edit is duplicate_annotation_id
    assert len(dataset) == len(data["images"])


def test_duplicate_image_id(coco_copy):
    data, write = coco_copy
    data["images"][1]["id"] = data["images"][0]["id"]
    with pytest.raises(ValueError, match=f"image id {data['images'][0]['id']} is used again"):
        CocoDataset(*write(data))
    dataset = CocoDataset(*write(data), on_bad_annotation="skip")
    assert len(dataset) == len(data["images"]) - 1


def test_image_file_problems(coco_copy):
    data, write = coco_copy
    ann_file, img_dir = write(data)
    missing, garbage, resized = data["images"][:3]
    Path(img_dir, missing["file_name"]).unlink()
    Path(img_dir, garbage["file_name"]).write_bytes(b"not an image")
    resized["width"] += 3
    write(data)
    with pytest.raises(ValueError) as error:
        CocoDataset(ann_file, img_dir)
    message = str(error.value)
    assert f"{missing['file_name']} (image {missing['id']}): image file not found" in message
    assert f"{garbage['file_name']} (image {garbage['id']}): cannot read the image" in message
    assert f"{resized['file_name']} (image {resized['id']}): the image is" in message
    assert "annotations say" in message
    dataset = CocoDataset(ann_file, img_dir, on_bad_annotation="skip")
    assert len(dataset) == len(data["images"]) - 3
    # Header checks can be turned off (the size disagreement then shows at load time).
    CocoDataset(ann_file, img_dir, check_images=False)


def test_many_problems_are_listed_up_to_a_limit(coco_copy):
    data, write = coco_copy
    for ann in data["annotations"][:25]:
        ann["bbox"][3] = -1
    with pytest.raises(ValueError) as error:
        CocoDataset(*write(data))
    lines = str(error.value).splitlines()
    assert "25 problems" in lines[0]
    assert sum("non-positive width or height" in line for line in lines) == 20
    assert "  ... and 5 more" in lines


def test_annotation_file_that_is_not_json(coco_copy, tmp_path):
    _, write = coco_copy
    ann_file, img_dir = write({})
    Path(ann_file).write_text('{"images": [\n  {"id": 1,\n  oops}]}')
    with pytest.raises(ValueError, match=r"is not valid JSON at line 3, column 3"):
        CocoDataset(ann_file, img_dir)


def test_annotation_file_that_is_not_coco(coco_copy):
    data, write = coco_copy
    del data["annotations"][2]["bbox"]
    with pytest.raises(ValueError, match=r"not in COCO format: .*`bbox`.*annotations\[2\]"):
        CocoDataset(*write(data))


def test_empty_dataset(coco_copy):
    data, write = coco_copy
    with pytest.raises(ValueError, match="has no images: the dataset is empty"):
        CocoDataset(*write(dict(data, images=[], annotations=[])))


def test_no_usable_annotation(coco_copy):
    data, write = coco_copy
    with pytest.raises(ValueError, match="no image has a usable annotation"):
        CocoDataset(*write(dict(data, annotations=[])), filter_empty=True)


def test_duplicate_category_id(coco_copy):
    data, write = coco_copy
    data["categories"][1]["id"] = 1
    with pytest.raises(ValueError, match="category id 1 is used twice"):
        CocoDataset(*write(data))


def test_policy_comes_from_the_recipe(coco_copy, tmp_path):
    data, write = coco_copy
    zero_width(data)
    ann_file, img_dir = write(data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data:\n  train: {{ann_file: {ann_file}, img_dir: {img_dir}}}\n"
        f"  val: {{ann_file: {ann_file}, img_dir: {img_dir}}}\n"
    )
    with pytest.raises(RecipeError, match="on_bad_annotation=skip"):
        build_dataset(load_recipe(recipe).data.train)
    cfg = load_recipe(recipe, ["data.on_bad_annotation=skip"])
    kept = build_dataset(cfg.data.train).annotations
    assert kept.num_annotations == len(data["annotations"]) - 1
    with pytest.raises(RecipeError, match="on_bad_annotation=skip"):  # per split
        build_dataset(
            load_recipe(
                recipe, ["data.on_bad_annotation=skip", "data.val.on_bad_annotation=error"]
            ).data.val,
            False,
        )
    with pytest.raises(RecipeError, match="must be one of \\['error', 'skip'\\]"):
        build_dataset(load_recipe(recipe, ["data.on_bad_annotation=ignore"]).data.train)
    # A node used outside a recipe stops on bad annotations.
    node = OmegaConf.structured(load_recipe(recipe).data.train)
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=False))
    with pytest.raises(RecipeError, match="on_bad_annotation=skip"):
        build_dataset(node)


def truncate(path: Path) -> None:
    """Keep the PNG header (the size still reads) but cut the pixel data."""
    path.write_bytes(path.read_bytes()[:100])


def test_unreadable_image_in_training_is_skipped_with_a_warning(coco_copy, caplog):
    data, write = coco_copy
    ann_file, img_dir = write(data)
    dataset = CocoDataset(ann_file, img_dir)  # validated while the file was whole
    bad = sorted(data["images"], key=lambda im: im["id"])[2]
    truncate(Path(img_dir, bad["file_name"]))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        image, target = dataset[2]
    assert target["image_id"] != bad["id"]
    # The stand-in has the same orientation.
    assert (image.shape[2] > image.shape[1]) == (bad["width"] > bad["height"])
    assert f"skipped image {bad['file_name']} (id {bad['id']})" in caplog.text
    assert "(1 skipped so far)" in caplog.text
    assert dataset.skipped_images == 1


def test_unreadable_images_are_counted_over_loader_workers(coco_copy):
    data, write = coco_copy
    ann_file, img_dir = write(data)
    dataset = CocoDataset(ann_file, img_dir)
    # One landscape and one other: a stand-in (same orientation) is never the other bad one.
    landscape = [im for im in data["images"] if im["width"] > im["height"]]
    other = [im for im in data["images"] if im["width"] <= im["height"]]
    bad = [landscape[0], other[0]]
    for image in bad:
        truncate(Path(img_dir, image["file_name"]))
    loader = build_dataloader(dataset, imgs_per_gpu=2, workers_per_gpu=2, shuffle=True)
    seen = [t["image_id"] for _, targets in loader for t in targets]
    assert len(seen) == len(dataset)
    assert not {im["id"] for im in bad} & set(seen)
    assert dataset.skipped_images == len(bad)


def test_storage_gone_stops_with_a_clear_error(coco_copy):
    data, write = coco_copy
    ann_file, img_dir = write(data)
    dataset = CocoDataset(ann_file, img_dir)
    for image in data["images"]:
        Path(img_dir, image["file_name"]).unlink()
    with pytest.raises(RuntimeError, match="could not be read .* is the image storage reachable"):
        dataset[0]
    assert dataset.skipped_images == MAX_FAILURES_IN_A_ROW


def test_build_dataset_default_checks_and_transforms(shapes):
    cfg = load_recipe(
        Path(__file__).parents[2] / "recipes" / "demo.yaml",
        [
            f"data.train.ann_file={shapes}/annotations/train.json",
            f"data.train.img_dir={shapes}/train",
            "data.train.type=CocoDataset",
            "data.train.min_size=[32]",
        ],
    ).data.train
    dataset = build_dataset(cfg)
    image, target = dataset[0]
    assert min(image.shape[-2:]) == 32
    assert target["masks"].shape[-2:] == image.shape[-2:]
    assert isinstance(target["boxes"], torch.Tensor)


def test_spawned_workers_count_into_the_same_counter(coco_copy):
    """The spawn start method (macOS, Windows) pickles the dataset into each worker."""
    data, write = coco_copy
    ann_file, img_dir = write(data)
    dataset = CocoDataset(ann_file, img_dir)
    assert dataset.coco is not None  # not sent to the workers
    bad = sorted(data["images"], key=lambda im: im["id"])[0]
    truncate(Path(img_dir, bad["file_name"]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=1, collate_fn=collate, multiprocessing_context="spawn"
    )
    seen = [t["image_id"] for _, targets in loader for t in targets]
    assert len(seen) == len(dataset) and bad["id"] not in seen
    assert dataset.skipped_images == 1


def test_data_file_problems_through_build_name_the_recipe_node(coco_copy, tmp_path):
    _, write = coco_copy
    ann_file, img_dir = write({})
    Path(ann_file).write_text("{")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data:\n  train: {{ann_file: {ann_file}, img_dir: {img_dir}}}\n"
        f"  val: {{ann_file: {tmp_path}/none.json, img_dir: {img_dir}}}\n"
    )
    cfg = load_recipe(recipe)
    with pytest.raises(RecipeError, match=r"^data.train: annotation file .* is not valid JSON"):
        build_dataset(cfg.data.train)
    with pytest.raises(RecipeError, match=r"^data.val: ann_file '.*none.json' does not exist"):
        build_dataset(cfg.data.val, train=False)


def test_a_dataset_class_of_ones_own_needs_one_registration(monkeypatch, tmp_path):
    monkeypatch.setattr(DATASETS, "entries", dict(DATASETS.entries))

    @DATASETS.register
    class Listed(torch.utils.data.Dataset):
        def __init__(self, names: list[str], flip_prob: float):
            self.names, self.flip_prob = names, flip_prob

        @classmethod
        def from_config(cls, cfg, train=True):
            return cls(Path(cfg.ann_file).read_text().split(), cfg.flip_prob if train else 0.0)

    (tmp_path / "list.txt").write_text("a.png b.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data:\n  train: {{type: Listed, ann_file: {tmp_path}/list.txt, img_dir: .}}\n"
        "  val: {ann_file: a.json, img_dir: imgs}\n"
    )
    dataset = build_dataset(load_recipe(recipe).data.train)
    assert isinstance(dataset, Listed)
    assert dataset.names == ["a.png", "b.png"] and dataset.flip_prob == 0.5


def test_boxes_without_area_never_reach_the_model(coco_copy):
    """The model refuses boxes without area, as torchvision's does; the pipeline keeps them
    from it, so such a set still trains: a zero-width annotation is left out
    (``on_bad_annotation=skip``), and so are instances that large-scale jitter crops away."""
    data, write = coco_copy
    zero_width(data)
    ann_file, img_dir = write(data)
    cfg = load_recipe(
        Path(__file__).parents[2] / "recipes" / "demo.yaml",
        [
            f"data.train.ann_file={ann_file}",
            f"data.train.img_dir={img_dir}",
            "data.train.type=CocoDataset",
            # Scaled to twice a 32 px square, then cut to it: most instances are cut away.
            "data.train.lsj_size=32",
            "data.train.lsj_scale=[2.0,2.0]",
            "data.on_bad_annotation=skip",
        ],
    ).data.train
    dataset = build_dataset(cfg)
    assert dataset.annotations.num_annotations == len(data["annotations"]) - 1
    torch.manual_seed(0)
    model = build_detector(lean_model_config(name="test_resnet"), num_classes=3).train()
    for images, targets in build_dataloader(dataset, 4, 0, shuffle=True):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
