"""One image reader: a picture gives the same pixels however its file stores it, and training,
evaluation and prediction read the same pixels from the same file."""

import json
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tests.models.conftest import lean_model_config
from trainer.data.coco import CocoDataset
from trainer.data.hf import HFDataset
from trainer.data.image_file import image_header, read_image
from trainer.data.inference_images import ImageFiles, inference_transform, to_image_tensor
from trainer.data.loader import collate
from trainer.models import build_detector

HEIGHT, WIDTH = 32, 48  # not square, so that a turned image shows


def picture() -> np.ndarray:
    """H x W x 3 uint8: flat 16-pixel blocks of six colours (JPEG keeps them nearly
    exactly; a palette holds them exactly)."""
    colours = np.array(
        [[200, 30, 40], [20, 180, 60], [30, 40, 210], [240, 220, 20], [90, 90, 90], [10, 200, 220]],
        np.uint8,
    )
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH] // 16
    return colours[rows * 3 + cols]


def grey() -> np.ndarray:
    return picture().mean(axis=2).round().astype(np.uint8)


def expected(pixels: np.ndarray) -> torch.Tensor:
    """[3, H, W] of an H x W x 3 or H x W (grey) uint8 array."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def write_png16(path: Path, samples: np.ndarray) -> None:
    """A 16-bit PNG of H x W (grey) or H x W x 3 (RGB) samples; Pillow writes 16-bit grey
    only."""
    height, width = samples.shape[:2]
    colour_type = 2 if samples.ndim == 3 else 0
    rows = samples.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# How ImageOps.exif_transpose turns each orientation upright; stored = the inverse of it.
STORED_FOR = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def save_oriented(path: Path, orientation: int, **options) -> None:
    """``picture()`` stored turned so that EXIF ``orientation`` shows it upright."""
    image = Image.fromarray(picture())
    if STORED_FOR[orientation] is not None:
        image = image.transpose(STORED_FOR[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), **options)


def rgb_png(path):
    Image.fromarray(picture()).save(path)
    return expected(picture())


def rgb16_png(path):
    write_png16(path, picture().astype(np.uint16) * 257)
    return expected(picture())


def rgb16_png_low_bytes_set(path):
    write_png16(path, picture().astype(np.uint16) * 256 + 255)
    return expected(picture())


def grey_png(path):
    Image.fromarray(grey()).save(path)
    return expected(grey())


def grey16_png(path):
    image = Image.fromarray(grey().astype(np.uint16) * 257)
    assert image.mode == "I;16"
    image.save(path)
    return expected(grey())


def grey32_tiff(path):
    """Mode I (32-bit integers), read as 16-bit values."""
    Image.fromarray(grey().astype(np.int32) * 257, mode="I").save(path)
    return expected(grey())


def palette_png_with_transparency(path):
    image = Image.fromarray(picture()).quantize(6)
    image.info["transparency"] = 0
    image.save(path)
    return expected(picture())


def grey_alpha_png(path):
    alpha = np.linspace(0, 255, HEIGHT * WIDTH).reshape(HEIGHT, WIDTH).astype(np.uint8)
    Image.fromarray(np.stack([grey(), alpha], axis=2), mode="LA").save(path)
    return expected(grey())


def rgba_png(path):
    alpha = np.linspace(0, 255, HEIGHT * WIDTH).reshape(HEIGHT, WIDTH, 1).astype(np.uint8)
    Image.fromarray(np.concatenate([picture(), alpha], axis=2), mode="RGBA").save(path)
    return expected(picture())


STORAGES = {
    "rgb.png": rgb_png,
    "rgb16.png": rgb16_png,
    "rgb16_low_bytes.png": rgb16_png_low_bytes_set,
    "grey.png": grey_png,
    "grey16.png": grey16_png,
    "grey32.tif": grey32_tiff,
    "palette.png": palette_png_with_transparency,
    "grey_alpha.png": grey_alpha_png,
    "rgba.png": rgba_png,
}


@pytest.mark.parametrize("name", STORAGES)
def test_every_storage_reads_as_the_picture(tmp_path, name):
    path = tmp_path / name
    want = STORAGES[name](path)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.is_contiguous()
    assert torch.equal(image, want)
    assert torch.equal(read_image(path.read_bytes()), want)  # bytes, as HF datasets hold them
    assert image_header(path) == (HEIGHT, WIDTH, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    path = tmp_path / "turned.png"
    save_oriented(path, orientation)
    with Image.open(path) as stored:
        sideways = stored.size == (HEIGHT, WIDTH)
    assert sideways == (orientation in (5, 6, 7, 8))
    assert torch.equal(read_image(path), expected(picture()))
    assert image_header(path) == (HEIGHT, WIDTH, orientation)


def test_jpeg_stored_turned_reads_nearly_as_the_upright_one(tmp_path):
    save_oriented(tmp_path / "upright.jpg", 1, quality=95)
    save_oriented(tmp_path / "turned.jpg", 6, quality=95)
    upright, turned = read_image(tmp_path / "upright.jpg"), read_image(tmp_path / "turned.jpg")
    assert turned.shape == upright.shape == (3, HEIGHT, WIDTH)
    difference = (turned.int() - upright.int()).abs()
    assert difference.float().mean() < 0.5 and difference.max() <= 4
    # Upright: the picture up to JPEG's loss (chroma blurs across the colour edges; the
    # picture flipped is ~70 away).
    assert (upright.int() - expected(picture()).int()).abs().float().mean() < 8


def test_unsupported_mode_is_refused_before_training(tmp_path):
    Image.fromarray(np.ones((HEIGHT, WIDTH), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="image mode F is not supported"):
        read_image(tmp_path / "float.tif")
    ann_file = write_annotations(tmp_path, ["float.tif"], [(HEIGHT, WIDTH)])
    with pytest.raises(ValueError) as error:
        CocoDataset(ann_file, tmp_path)
    assert "float.tif (image 1): cannot read the image: image mode F is not supported" in str(
        error.value
    )


def write_annotations(root: Path, files: list[str], sizes: list[tuple[int, int]]) -> Path:
    """A boxes-only COCO file: one box per image, sizes (height, width) as displayed."""
    images, annotations = [], []
    for i, (name, (height, width)) in enumerate(zip(files, sizes), start=1):
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        annotations.append(
            {"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 12], "area": 120}
        )
    path = root / "annotations.json"
    categories = [{"id": 1, "name": "block"}]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def varied_files(root: Path) -> list[str]:
    """The picture as an EXIF-turned JPEG, and in other storages."""
    save_oriented(root / "turned.jpg", 6, quality=90)
    names = ["turned.jpg"]
    for name in ("grey16.png", "palette.png", "rgba.png", "rgb16.png"):
        STORAGES[name](root / name)
        names.append(name)
    return names


def test_training_evaluation_and_prediction_read_the_same_pixels(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    names = varied_files(img_dir)
    # Annotations give the displayed size: the checks compare it with the turned image.
    ann_file = write_annotations(tmp_path, names, [(HEIGHT, WIDTH)] * len(names))
    transform = inference_transform([24], 64)
    training = CocoDataset(ann_file, img_dir)
    evaluation = CocoDataset(ann_file, img_dir, transforms=transform)
    files = [img_dir / name for name in names]
    predict = ImageFiles(files, transform)
    hf_path = tmp_path / "hf"
    rows = {"image": [str(f) for f in files], "image_id": list(range(1, len(files) + 1))}
    objects = [{"bbox": [[2.0, 2.0, 10.0, 12.0]], "category": [0]}] * len(files)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=["block"])),
            },
        }
    )
    datasets.Dataset.from_dict({**rows, "objects": objects}, features=features).save_to_disk(
        str(hf_path)
    )
    hf = HFDataset(str(hf_path))
    for index, file in enumerate(files):
        image = training[index][0]
        assert image.shape == (3, HEIGHT, WIDTH)
        resized, target = predict[index]
        assert torch.equal(target["original"], image), file.name
        assert torch.equal(hf[index][0], image), file.name
        assert torch.equal(to_image_tensor(file), image), file.name  # Detector.predict
        with Image.open(file) as pil:
            assert torch.equal(to_image_tensor(pil), image), file.name
        assert torch.equal(evaluation[index][0], resized), file.name


def test_annotations_in_the_stored_orientation_are_reported(tmp_path):
    save_oriented(tmp_path / "turned.jpg", 6)
    ann_file = write_annotations(tmp_path, ["turned.jpg"], [(WIDTH, HEIGHT)])
    with pytest.raises(ValueError) as error:
        CocoDataset(ann_file, tmp_path)
    assert (
        f"turned.jpg (image 1): the image is {WIDTH}x{HEIGHT} (width x height, as displayed: "
        f"its EXIF orientation is 6 and it is stored {HEIGHT}x{WIDTH}) but the annotations "
        f"say {HEIGHT}x{WIDTH}"
    ) in str(error.value)


def test_a_model_detects_the_same_in_8_and_16_bit_files(tmp_path):
    Image.fromarray(grey()).save(tmp_path / "grey8.png")
    grey16_png(tmp_path / "grey16.png")
    cfg = lean_model_config(name="test_resnet")
    cfg.roi_heads.score_thresh = 0.0
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3).eval()
    paths = [tmp_path / "grey8.png", tmp_path / "grey16.png"]
    files = ImageFiles(paths, inference_transform([64], 96))
    images, targets = collate([files[0], files[1]])
    with torch.no_grad():
        eight, sixteen = model(images, output_sizes=[t["orig_size"] for t in targets])
    assert len(eight["scores"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(eight[key], sixteen[key]), key
