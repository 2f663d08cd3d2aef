"""Batched ``trainer.predict``: images grouped by padded size, read in workers, outputs
written by threads; the same predictions as one image at a time, in file order."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.test_predict import ALL, DEMO, trained  # noqa: F401  (module fixture)
from trainer import predict
from trainer.predict import same_size_batches


def items(sizes: list[tuple[int, int]]):
    return [(index, torch.zeros(3, h, w), {}) for index, (h, w) in enumerate(sizes)]


def indices(batches) -> list[list[int]]:
    return [[item[0] for item in batch] for batch in batches]


def test_batches_hold_images_that_pad_to_one_size():
    sizes = [(64, 64), (64, 96), (60, 60), (50, 90), (100, 100), (33, 33)]
    # Padded to 32: (64, 64) (64, 96) (64, 64) (64, 96) (128, 128) (64, 64).
    batches = list(same_size_batches(items(sizes), 2, 32, window=8))
    assert indices(batches) == [[0, 2], [1, 3], [4], [5]]
    # A window of 3 images: a group still short when it fills goes alone, oldest first.
    batches = list(same_size_batches(items(sizes), 3, 32, window=3))
    assert indices(batches) == [[0, 2], [1, 3], [4], [5]]
    batches = list(same_size_batches(items(sizes * 2), 3, 32, window=100))
    assert indices(batches) == [[0, 2, 5], [1, 3, 7], [6, 8, 11], [4, 10], [9]]
    # A model that takes any sizes together (ONNX, one image at a time): file order.
    assert indices(same_size_batches(items(sizes), 4, None, window=8)) == [[0, 1, 2, 3], [4, 5]]


def mixed_folder(val, folder):
    """The val images as PNG and JPEG, portrait and landscape, at several sizes, some in a
    subfolder."""
    (folder / "sub").mkdir(parents=True)
    for i, file in enumerate(sorted(val.glob("*.png"))):
        image = Image.open(file).convert("RGB")
        width, height = image.size
        image.save(folder / file.name)
        tall = image.transpose(Image.Transpose.ROTATE_90).resize((height, width * 2))
        tall.save(folder / "sub" / f"{file.stem}_tall.png")
        image.resize((width * 3, height)).save(folder / f"{file.stem}_wide.jpg", quality=95)
        image.resize((width + 7 * i, height + 5 * i)).save(folder / "sub" / f"{file.stem}_odd.png")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*"))


def same_predictions(batched: list[dict], single: list[dict]) -> None:
    """Equal up to float rounding: the same detections (score within 1e-5, box within a
    hundredth of a pixel, identical masks), in the same order of files."""
    assert [r["file_name"] for r in batched] == [r["file_name"] for r in single]
    left = list(single)
    for result in batched:
        same = [
            r
            for r in left
            if (r["file_name"], r["category_id"], r["segmentation"])
            == (result["file_name"], result["category_id"], result["segmentation"])
            and abs(r["score"] - result["score"]) <= 1e-5
            and all(abs(a - b) <= 0.011 for a, b in zip(r["bbox"], result["bbox"]))
        ]
        assert same, f"no counterpart for {result['file_name']} {result['score']}"
        left.remove(same[0])


def test_batched_predict_equals_one_image_at_a_time(trained, tmp_path, capsys):  # noqa: F811
    root, overrides = trained
    files = mixed_folder(root / "shapes/val", tmp_path / "mixed")
    args = ["--checkpoint", str(root / "work"), "--images", str(tmp_path / "mixed")]
    args += ["--score-threshold", ALL]
    single = predict.main(
        [DEMO, *args, "--out", str(tmp_path / "one"), "--batch-size", "1", *overrides]
    )
    capsys.readouterr()
    batched = predict.main(
        [DEMO, *args, "--out", str(tmp_path / "batched"), "--batch-size", "4", "--workers", "2"]
        + overrides
    )
    assert "img/s" in capsys.readouterr().err  # the progress bar counts images per second
    assert len(single) > len(files)
    same_predictions(batched, single)
    assert json.loads((tmp_path / "batched/predictions.json").read_text()) == batched
    # Results come in file order (every file has detections at this threshold).
    assert list(dict.fromkeys(r["file_name"] for r in batched)) == files
    written = tmp_path / "batched/overlays"
    expected = [predict.overlay_path(tmp_path / "batched", f).relative_to(written) for f in files]
    assert sorted(p.relative_to(written) for p in written.rglob("*.png")) == sorted(expected)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_an_overlay_that_cannot_be_written_stops_the_run(trained, tmp_path, batch_size):  # noqa: F811
    """An error in a writer thread is not lost."""
    root, overrides = trained
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays/000002.png").mkdir()  # a folder where the overlay should go
    args = ["--checkpoint", str(root / "work"), "--images", str(root / "shapes/val")]
    with pytest.raises(RuntimeError):
        predict.main([DEMO, *args, "--out", str(out), "--batch-size", str(batch_size), *overrides])
