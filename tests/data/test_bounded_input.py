"""Bad COCO files are found before training, in bounded memory: polygons too long or out of
their image, numbers that are not finite, RLE that does not cover its image, image files
named outside the image folder."""

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.data.test_checks import image_of, polygon_annotation, rle_annotation
from trainer.data import segmentation
from trainer.data.annotations import Annotations
from trainer.data.checks import find_problems
from trainer.data.coco import CocoDataset
from trainer.data.segmentation import (
    MAX_OBJECT_POINTS,
    _compressed_runs,
    segmentation_problem,
)


def size_of(data: dict, ann: dict) -> tuple[int, int]:
    image = image_of(data, ann)
    return image["height"], image["width"]


def write_with(write, data: dict, literals: dict[str, str]) -> tuple[str, str]:
    """Write ``data``, then put JSON text where strings stand for it (1e999 has no Python
    value that json writes so)."""
    ann_file, img_dir = write(data)
    text = Path(ann_file).read_text()
    for stand_in, literal in literals.items():
        text = text.replace(json.dumps(stand_in), literal)
    Path(ann_file).write_text(text)
    return ann_file, img_dir


def infinite_coordinate(data):
    ann = polygon_annotation(data)
    ann["segmentation"][0][0] = "INF"
    return ann, "polygon coordinate that is not a finite number (inf or NaN)", {"INF": "1e999"}


def huge_coordinate(data):
    ann = polygon_annotation(data)
    polygon = ann["segmentation"][0]
    polygon[0] = 1e9
    height, width = size_of(data, ann)
    xs, ys = polygon[0::2], polygon[1::2]
    return (
        ann,
        f"polygon spans x {min(xs):g} to 1e+09, y {min(ys):g} to {max(ys):g}: further outside "
        f"the {width}x{height} image than 10% of its size",
        {},
    )


def polygon_wholly_outside(data):
    ann = polygon_annotation(data)
    height, width = size_of(data, ann)
    ann["segmentation"] = [[width + 1, 1, width + 4, 1, width + 4, 5]]
    return (
        ann,
        f"polygon spans x {width + 1} to {width + 4}, y 1 to 5: wholly outside the "
        f"{width}x{height} image",
        {},
    )


def too_many_points(data):
    """Two polygons, each under the limit, over it together: the limit is per object."""
    ann = polygon_annotation(data)
    half = MAX_OBJECT_POINTS // 2 + 1
    polygon = np.tile([5.0, 5.0, 9.0, 5.0, 9.0, 9.0], half // 3 + 1)[: 2 * half].tolist()
    ann["segmentation"] = [polygon, polygon]
    return (
        ann,
        f"{2 * half} polygon points, over the limit of {MAX_OBJECT_POINTS} per object",
        {},
    )


def zigzag_across_the_image(data):
    ann = polygon_annotation(data)
    height, width = size_of(data, ann)
    points = 20_000
    xs = np.where(np.arange(points) % 2 == 0, 0.0, width - 1.0)
    ys = np.linspace(0, height - 1, points).round(2)
    ann["segmentation"] = [np.stack([xs, ys], axis=1).ravel().tolist()]
    # Per edge, the longer of its x and y extent, around the closed outline.
    dx = np.abs(np.diff(np.append(xs, xs[0])))
    dy = np.abs(np.diff(np.append(ys, ys[0])))
    boundary = np.maximum(dx, dy).sum()
    return (
        ann,
        f"polygon boundary {boundary:.0f} pixels long, over 100 times the {width}x{height} "
        "image's width + height",
        {},
    )


def nested_lists(data):
    ann = polygon_annotation(data)
    ann["segmentation"] = [[[1, 2], [5, 2], [5, 6]]]
    return (
        ann,
        "segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...] of numbers",
        {},
    )


def rle_counts_past_the_image(data):
    ann = rle_annotation(data)
    height, width = size_of(data, ann)
    ann["segmentation"] = {"size": [height, width], "counts": [height * width, 5]}
    return (
        ann,
        f"RLE counts cover {height * width + 5} pixels, not the {width}x{height} image's "
        f"{height * width}",
        {},
    )


def negative_rle_count(data):
    ann = rle_annotation(data)
    height, width = size_of(data, ann)
    ann["segmentation"] = {"size": [height, width], "counts": [-5, height * width + 5]}
    return ann, "RLE counts must not be negative", {}


def compressed_rle_of_a_wider_mask(data):
    ann = rle_annotation(data)
    height, width = size_of(data, ann)
    wider = mask_utils.encode(np.asfortranarray(np.ones((height, width + 1), np.uint8)))
    ann["segmentation"] = {"size": [height, width], "counts": wider["counts"].decode()}
    return (
        ann,
        f"RLE counts cover {height * (width + 1)} pixels, not the {width}x{height} image's "
        f"{height * width}",
        {},
    )


def truncated_compressed_rle(data):
    ann = rle_annotation(data)
    ann["segmentation"]["counts"] += "o"  # a 5-bit group that says more follow
    return ann, "RLE counts are not COCO's compressed RLE text", {}


def foreign_byte_in_compressed_rle(data):
    ann = rle_annotation(data)
    ann["segmentation"]["counts"] = "~" + ann["segmentation"]["counts"]
    return ann, "RLE counts are not COCO's compressed RLE text", {}


def overlong_count_in_compressed_rle(data):
    ann = rle_annotation(data)
    ann["segmentation"]["counts"] = "oooooooo0" + ann["segmentation"]["counts"]
    return ann, "RLE counts are not COCO's compressed RLE text", {}


SEGMENTATION_EDITS = [
    infinite_coordinate,
    huge_coordinate,
    polygon_wholly_outside,
    too_many_points,
    zigzag_across_the_image,
    nested_lists,
    rle_counts_past_the_image,
    negative_rle_count,
    compressed_rle_of_a_wider_mask,
    truncated_compressed_rle,
    foreign_byte_in_compressed_rle,
    overlong_count_in_compressed_rle,
]


@pytest.mark.parametrize("edit", SEGMENTATION_EDITS)
def test_bad_segmentation_is_reported_then_skipped(coco_copy, edit):
    data, write = coco_copy
    ann, detail, literals = edit(data)
    files = write_with(write, data, literals)
    with pytest.raises(ValueError) as error:
        CocoDataset(*files)
    lines = str(error.value).splitlines()
    assert lines[0].endswith(" 1 problem in the annotations or images (bad segmentation 1):")
    assert lines[0].startswith(files[0])
    file_name = image_of(data, ann)["file_name"]
    assert lines[1] == f"  {file_name} (image {ann['image_id']}, annotation {ann['id']}): {detail}"

    dataset = CocoDataset(*files, on_bad_annotation="skip")
    assert ann["id"] not in dataset.coco.anns
    for index in range(len(dataset)):  # every kept mask draws
        dataset[index]
    # Hugging Face datasets are checked by the same rules.
    segm = json.loads(Path(files[0]).read_text())["annotations"]
    segm = next(a for a in segm if a["id"] == ann["id"])["segmentation"]
    assert segmentation_problem(segm, *size_of(data, ann)) == detail


def test_points_a_little_outside_are_cut_at_the_border(coco_copy):
    """Annotation tools let points stray past the border; the mask is what pycocotools'
    annToMask draws: cut there."""
    data, write = coco_copy
    ann = polygon_annotation(data)
    height, width = size_of(data, ann)
    ann["segmentation"] = [[-3, -2, width + 4, 10, 20, height + 5]]
    dataset = CocoDataset(*write(data))
    index = sorted(im["id"] for im in data["images"]).index(ann["image_id"])
    masks = dataset[index][1]["masks"]
    expected = dataset.coco.annToMask(dataset.coco.anns[ann["id"]])
    assert any(np.array_equal(mask.numpy(), expected) for mask in masks)
    assert expected[0, 0] == 1 and expected[-1, 20] == 1


def test_a_huge_polygon_is_refused_in_bounded_memory(coco_copy):
    data, write = coco_copy
    ann = polygon_annotation(data)
    ann["segmentation"] = ["HUGE"]
    points = 2_000_000
    polygon = "[" + ",".join(["12.5"] * (2 * points)) + "]"
    ann_file, img_dir = write_with(write, data, {"HUGE": polygon})
    size = Path(ann_file).stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as error:
            CocoDataset(ann_file, img_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"{points} polygon points, over the limit of {MAX_OBJECT_POINTS} per object" in str(
        error.value
    )
    # The file's bytes and their copy as polygon text, and windows of a fixed size for the
    # checks: nothing per point.
    assert peak < 2 * size + 16 * 2**20


def test_checks_do_not_depend_on_the_window(coco_copy, monkeypatch):
    """Polygon text is scanned and parsed a window at a time: windows of a few bytes, cutting
    through every polygon, find the same problems as one window."""
    data, write = coco_copy
    polygons = [a for a in data["annotations"] if isinstance(a["segmentation"], list)]
    height, width = size_of(data, polygons[1])
    polygons[0]["segmentation"][0][0] = "INF"
    polygons[1]["segmentation"].append([width + 1, 1, width + 4, 1, width + 4, 5])
    polygons[2]["segmentation"] = [[[1, 2], [5, 2], [5, 6]]]
    files = write_with(write, data, {"INF": "1e999"})
    with pytest.raises(ValueError) as whole:
        CocoDataset(*files)
    monkeypatch.setattr(segmentation, "_WINDOW", 7)
    with pytest.raises(ValueError) as windowed:
        CocoDataset(*files)
    assert str(windowed.value) == str(whole.value)
    assert "(bad segmentation 3)" in str(whole.value)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 33), (64, 64)])
def test_compressed_rle_reads_as_pycocotools_writes_it(shape):
    rng = np.random.default_rng(shape[0])
    for fill in (0.0, 0.02, 0.5, 1.0):
        mask = (rng.random(shape) < fill).astype(np.uint8)
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"]
        # Runs of 0, 1, 0, ... in column-major order, starting with zeros.
        flat = mask.ravel(order="F")
        changes = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
        if flat[0] == 1:
            runs = np.concatenate([[0], runs])
        assert _compressed_runs(counts).tolist() == runs.tolist()
        assert _compressed_runs(counts.decode()).tolist() == runs.tolist()


def test_file_names_outside_the_image_folder_are_never_opened(coco_copy):
    data, write = coco_copy
    ann_file, img_dir = write(data)
    first, second = sorted(data["images"], key=lambda im: im["id"])[:2]
    names = first["file_name"], second["file_name"]
    # Real images there: unchecked, they would be read.
    outside = Path(img_dir).parent / "elsewhere.png"
    shutil.copy(Path(img_dir, first["file_name"]), outside)
    first["file_name"] = "../elsewhere.png"
    second["file_name"] = str(Path(img_dir, second["file_name"]).resolve())
    write(data)
    with pytest.raises(ValueError) as error:
        CocoDataset(ann_file, img_dir)
    lines = str(error.value).splitlines()
    assert "2 problems in the annotations or images (file outside the image folder 2)" in lines[0]
    assert lines[1] == (
        f"  ../elsewhere.png (image {first['id']}): file_name '../elsewhere.png' is not a path "
        f"inside the image folder '{img_dir}' (img_dir)"
    )
    assert lines[2] == (
        f"  {second['file_name']} (image {second['id']}): file_name '{second['file_name']}' "
        f"is not a path inside the image folder '{img_dir}' (img_dir)"
    )
    dataset = CocoDataset(ann_file, img_dir, on_bad_annotation="skip")
    assert len(dataset) == len(data["images"]) - 2
    # A name that steps out of a subfolder and stays inside is fine.
    Path(img_dir, "sub").mkdir()
    first["file_name"], second["file_name"] = f"sub/../{names[0]}", names[1]
    write(data)
    assert len(CocoDataset(ann_file, img_dir)) == len(data["images"])


def test_image_size_too_large_to_draw(coco_copy):
    data, write = coco_copy
    image = data["images"][0]
    image["width"] = 2**24 + 1
    with pytest.raises(ValueError) as error:
        CocoDataset(*write(data), check_images=False)
    assert (
        f"{image['file_name']} (image {image['id']}): image size {2**24 + 1}x{image['height']} "
        "(width x height) has a side over 16777216 pixels"
    ) in str(error.value)


def test_non_finite_box_names_the_annotation(coco_copy):
    data, write = coco_copy
    ann = data["annotations"][3]
    ann["bbox"][0] = "INF"
    files = write_with(write, data, {"INF": "1e999"})
    with pytest.raises(ValueError) as error:
        CocoDataset(*files)
    assert str(error.value) == (
        f"annotation file '{files[0]}' is not in COCO format: Number out of range - at "
        f"`$.annotations[3].bbox[0]` (annotation {ann['id']} of image {ann['image_id']})."
    )
    ann["bbox"][0] = "NAN"
    files = write_with(write, data, {"NAN": "NaN"})
    with pytest.raises(ValueError) as error:
        CocoDataset(*files)
    assert "is not valid JSON at line 1, column" in str(error.value)
    assert str(error.value).endswith("(NaN and Infinity are not JSON numbers).")


def test_non_finite_box_values_are_named():
    """Hugging Face datasets hold floats, inf and NaN among them."""
    table = Annotations(
        image_ids=np.array([1]),
        file_names=np.array(["row 0"]),
        heights=np.array([20]),
        widths=np.array([30]),
        image_source=np.array([0]),
        ann_ids=np.array([1, 2]),
        ann_image_ids=np.array([1, 1]),
        category_ids=np.array([1, 1]),
        boxes=np.array([[np.inf, 1, 2, 3], [1, np.nan, 2, 3]]),
        areas=np.array([6.0, 6.0]),
        iscrowd=np.zeros(2, bool),
        ann_source=np.arange(2),
        categories={1: "thing"},
    )
    problems = [str(p) for p in find_problems(table).problems]
    assert problems == [
        "row 0 (image 1, annotation 1): bbox [inf, 1, 2, 3] has a coordinate that is not a "
        "finite number",
        "row 0 (image 1, annotation 2): bbox [1, nan, 2, 3] has a coordinate that is not a "
        "finite number",
    ]


def test_segmentations_of_an_image_without_a_size_are_not_judged(coco_copy):
    data, write = coco_copy
    ann = polygon_annotation(data)
    image = image_of(data, ann)
    image["width"] = 0
    with pytest.raises(ValueError) as error:
        CocoDataset(*write(data), check_images=False)
    lines = str(error.value).splitlines()
    assert "1 problem in the annotations or images (non-positive image size 1)" in lines[0]
    assert lines[1] == (
        f"  {image['file_name']} (image {image['id']}): image size 0x{image['height']} "
        "(width x height) is not positive"
    )
