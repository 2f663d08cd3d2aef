"""``trainer.Detector``: loading, predicting from every kind of image, saving and sharing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_predict import ALL, DEMO, trained  # noqa: F401  (module fixture)
from trainer import Detector, predict
from trainer.config import RecipeError


@pytest.fixture(scope="module")
def detector(trained):  # noqa: F811
    root, _ = trained
    return Detector.from_pretrained(root / "work", device="cpu")


def test_classes_and_detections_equal_the_cli(trained, detector, tmp_path):  # noqa: F811
    root, overrides = trained
    assert detector.classes == ["circle", "square", "triangle"]
    files = sorted((root / "shapes/val").glob("*.png"))
    cli = predict.main(
        [
            DEMO,
            *("--checkpoint", str(root / "work"), "--images", str(root / "shapes/val")),
            *("--out", str(tmp_path), "--score-threshold", ALL, "--batch-size", "1"),
            *overrides,
        ]
    )
    results = detector.predict(files, score_threshold=float(ALL))
    assert len(results) == len(files)
    from_api = []
    for file, result in zip(files, results):
        assert set(result) == {"boxes", "scores", "labels", "masks"}
        assert result["masks"].dtype == torch.bool
        for box, score, label in zip(result["boxes"], result["scores"], result["labels"]):
            x1, y1, x2, y2 = box.tolist()
            from_api.append(
                (file.name, detector.classes[label - 1], score.item(), [x1, y1, x2 - x1, y2 - y1])
            )
    from_cli = [(r["file_name"], r["category_name"], r["score"], r["bbox"]) for r in cli]
    assert len(from_api) == len(from_cli) > 0
    for api, ref in zip(from_api, from_cli):
        assert api[:2] == ref[:2]
        assert api[2] == pytest.approx(ref[2], abs=1e-6)
        assert api[3] == pytest.approx(ref[3], abs=0.006)  # results round to 0.01 px


def test_every_kind_of_image_gives_the_same_detections(trained, detector):  # noqa: F811
    root, _ = trained
    file = root / "shapes/val/000002.png"
    pil = Image.open(file)
    array = np.asarray(pil.convert("RGB"))
    uint8 = torch.from_numpy(array.copy()).permute(2, 0, 1)
    reference = detector.predict(file, score_threshold=float(ALL))
    assert len(reference["scores"]) > 0
    # A float image in [0, 1] is read as the 8-bit picture it stands for.
    for image in (pil, array, uint8, uint8.float() / 255):
        result = detector.predict(image, score_threshold=float(ALL))
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(result[key], reference[key]), key
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        detector.predict(array.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="image file '.*missing.png' does not exist"):
        detector.predict(root / "missing.png")


def test_save_pretrained_round_trip_and_hub_upload(detector, trained, tmp_path, monkeypatch):  # noqa: F811
    root, _ = trained
    image = root / "shapes/val/000002.png"
    reference = detector.predict(image, score_threshold=float(ALL))
    folder = detector.save_pretrained(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} >= {
        "model.safetensors",
        "config.yaml",
        "classes.json",
        "README.md",
    }
    assert json.loads((folder / "classes.json").read_text())["names"] == detector.classes
    assert "circle, square, triangle" in (folder / "README.md").read_text()
    loaded = Detector.from_pretrained(folder)
    assert loaded.classes == detector.classes
    result = loaded.predict(image, score_threshold=float(ALL))
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(result[key], reference[key])

    # The Hub's network calls are out of reach here: what would be uploaded is loaded back.
    uploaded = {}

    class OfflineApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path):
            again = Detector.from_pretrained(folder_path)
            uploaded["classes"] = again.classes
            uploaded["card"] = (folder_path + "/README.md", open(folder_path + "/README.md").read())
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr("huggingface_hub.HfApi", OfflineApi)
    assert detector.push_to_hub("someone/shapes").endswith("/commit/0")
    assert uploaded["repo"] == "someone/shapes" and uploaded["classes"] == detector.classes
    assert 'Detector.from_pretrained("someone/shapes")' in uploaded["card"][1]


def test_overrides_and_classes_given_by_the_caller(trained, tmp_path):  # noqa: F811
    root, _ = trained
    renamed = Detector.from_pretrained(
        root / "work", classes=["a", "b", "c"], **{"data.val.min_size": [64]}
    )
    assert renamed.classes == ["a", "b", "c"]
    assert list(renamed.cfg.data.val.min_size) == [64]
    bare = tmp_path / "bare.pth"
    torch.save(renamed.model.state_dict(), bare)
    with pytest.raises(RecipeError, match="carry no recipe"):
        Detector.from_pretrained(bare)


def test_model_compiled_for_inference_detects_the_same(trained, detector):  # noqa: F811
    """model.compile_inference=true: backbone, FPN and RPN head compiled (weights frozen)
    by trainer.predict, trainer.evaluate and Detector; the detections stay."""
    root, _ = trained
    compiled = Detector.from_pretrained(
        root / "work", device="cpu", **{"model.compile_inference": True}
    )
    assert compiled.model.backbone._compiled_call_impl is not None
    assert detector.model.backbone._compiled_call_impl is None
    file = root / "shapes/val/000002.png"
    expected = detector.predict(file, score_threshold=0.05)
    got = compiled.predict(file, score_threshold=0.05)
    assert len(expected["boxes"]) > 0
    gap = (expected["boxes"][:, None] - got["boxes"][None]).abs().amax(-1)
    same_class = expected["labels"][:, None] == got["labels"][None]
    gap = torch.where(same_class, gap, torch.inf)
    assert (gap.amin(1) < 0.5).float().mean() > 0.9
