"""``python -m trainer.export`` to ONNX, and the export run by onnxruntime from
``trainer.predict``, ``Detector`` and the torch-free ``trainer.onnx_model``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from tests.test_predict import ALL, ROOT, trained  # noqa: F401  (module fixture)
from trainer import Detector, predict
from trainer.data.image_file import read_image
from trainer.data.inference_images import inference_transform, prepare_image
from trainer.export import ExportableMaskRCNN
from trainer.onnx_model import MissingDependencyError, paste_masks, paste_masks_torchvision
from trainer.ops.masks import paste_masks as torch_paste_masks

SIZES = (96, 160)  # data.val.min_size of the two runs: one graph, two input sizes


# What the exported graph computes in: the PyTorch model's precision to compare it with.
FP32 = {"model.inference_precision": "fp32"}


def onnx_ready() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def exported(trained):  # noqa: F811
    """The demo checkpoint exported to ONNX; returns the export folder."""
    onnx_ready()
    from trainer import export

    root, _ = trained
    export.main(["--checkpoint", str(root / "work"), "--out", str(root / "export")])
    return root / "export"


def match_detections(ref: dict, out: dict) -> list[tuple[int, int]]:
    """Pairs (i, j) of the same detection in two results: same label, score within 1e-5,
    box within 1e-3 px. Ties in score may come in either order, so pairs are searched."""
    assert len(out["scores"]) == len(ref["scores"])
    pairs, used = [], set()
    for i in range(len(ref["scores"])):
        found = [
            j
            for j in range(len(out["scores"]))
            if j not in used
            and out["labels"][j] == ref["labels"][i]
            and abs(out["scores"][j] - ref["scores"][i]) <= 1e-5
            and np.abs(np.asarray(out["boxes"][j]) - np.asarray(ref["boxes"][i])).max() <= 1e-3
        ]
        assert found, f"detection {i} of the reference has no counterpart"
        used.add(found[0])
        pairs.append((i, found[0]))
    return pairs


def test_export_writes_a_dynamic_size_graph_with_its_recipe_classes_and_preprocessing(
    exported,
    trained,  # noqa: F811
):
    import onnx

    root, _ = trained
    assert {p.name for p in exported.iterdir()} == {
        "model.onnx",
        "preprocessing.json",
        "classes.json",
        "config.yaml",
    }
    checkpoint = root / "work/checkpoints/final"
    assert (exported / "classes.json").read_text() == (checkpoint / "classes.json").read_text()
    preprocessing = json.loads((exported / "preprocessing.json").read_text())
    assert preprocessing["min_size"] == [96] and preprocessing["max_size"] == 200
    assert preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert preprocessing["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert preprocessing["mask_paste"] == "exact" and preprocessing["opset"] == 18

    model = onnx.load(str(exported / "model.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_value == 3 and dims[1].dim_param and dims[2].dim_param
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["preprocessing"]) == preprocessing
    assert json.loads(metadata["classes"])["names"] == ["circle", "square", "triangle"]


@pytest.mark.parametrize("min_size", SIZES)
def test_onnxruntime_gives_the_pytorch_detections(exported, trained, min_size):  # noqa: F811
    """Detector on the export and on the checkpoint: the same boxes, labels and scores, and
    masks that agree, at two input sizes of the one graph."""
    root, _ = trained
    size = {"data.val.min_size": [min_size]}
    # The graph is fp32: the reference is the PyTorch model in fp32 (on CPUs with native
    # bf16 the default, inference_precision auto, infers in bf16).
    reference = Detector.from_pretrained(root / "work", device="cpu", **size, **FP32)
    onnx_detector = Detector.from_pretrained(exported, device="cpu", **size)
    assert onnx_detector.classes == reference.classes
    assert "onnxruntime" in repr(onnx_detector)
    files = sorted((root / "shapes/val").glob("*.png"))
    pixels = disagreeing = matched = 0
    for ref, out in zip(
        reference.predict(files, score_threshold=float(ALL)),
        onnx_detector.predict(files, score_threshold=float(ALL)),
    ):
        for i, j in match_detections(ref, out):
            pixels += ref["masks"][i].sum().item()
            disagreeing += (ref["masks"][i] != out["masks"][j]).sum().item()
            matched += 1
    assert matched > 0 and pixels > 0
    assert disagreeing <= 0.001 * pixels


def test_graph_mask_probabilities_equal_the_pytorch_ones(exported, trained):  # noqa: F811
    from trainer.onnx_model import OnnxMaskRCNN

    root, _ = trained
    detector = Detector.from_pretrained(root / "work", device="cpu")
    wrapper = ExportableMaskRCNN(detector.model).eval()
    runtime = OnnxMaskRCNN(exported / "model.onnx")
    transform = inference_transform([160], 400)
    image = prepare_image(read_image(root / "shapes/val/000003.png"), transform)
    with torch.no_grad():
        boxes, scores, labels, probs = wrapper(image)
    raw = runtime.run(image.numpy())
    ref = {"boxes": boxes.numpy(), "scores": scores.numpy(), "labels": labels.numpy()}
    pairs = match_detections(ref, raw)
    assert pairs
    for i, j in pairs:
        np.testing.assert_allclose(raw["mask_probs"][j], probs[i].numpy(), atol=1e-4)


def test_predict_takes_the_export_or_its_model_file(exported, trained, tmp_path):  # noqa: F811
    """No RECIPE: the export carries its recipe and classes, like a checkpoint folder."""
    root, overrides = trained
    images = ["--images", str(root / "shapes/val"), "--score-threshold", ALL]
    reference = predict.main(
        ["--checkpoint", str(root / "work"), *images, "--out", str(tmp_path / "pt"), *overrides]
        + ["model.inference_precision=fp32"]
    )
    from_folder = predict.main(
        ["--checkpoint", str(exported), *images, "--out", str(tmp_path / "a")]
    )
    from_file = predict.main(
        ["--checkpoint", str(exported / "model.onnx"), *images, "--out", str(tmp_path / "b")]
    )
    assert from_file == from_folder
    assert len(from_folder) == len(reference) > 0
    by_file: dict[str, list] = {}
    for result in reference:
        by_file.setdefault(result["file_name"], []).append(result)
    for result in from_folder:
        candidates = by_file[result["file_name"]]
        same = [
            r
            for r in candidates
            if r["category_name"] == result["category_name"]
            and abs(r["score"] - result["score"]) <= 1e-5
            and np.allclose(r["bbox"], result["bbox"], atol=0.011)
        ]
        assert same, result
        candidates.remove(same[0])
    assert sorted(p.name for p in (tmp_path / "a/overlays").iterdir()) == sorted(
        p.name for p in (root / "shapes/val").iterdir()
    )


def test_the_runtime_module_needs_no_torch(exported, trained, tmp_path):  # noqa: F811
    """trainer/onnx_model.py alone, with torch made unimportable, gives the detections of
    the export run from the package."""
    root, _ = trained
    file = root / "shapes/val/000002.png"
    original = read_image(file)
    resized = prepare_image(original, inference_transform([96], 200))
    np.save(tmp_path / "resized.npy", resized.numpy())
    script = f"""
import importlib.util, sys
import numpy as np
sys.modules["torch"] = None  # any import of torch fails
spec = importlib.util.spec_from_file_location("onnx_model", {str(ROOT / "trainer/onnx_model.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.OnnxMaskRCNN({str(exported / "model.onnx")!r})
resized = np.load({str(tmp_path / "resized.npy")!r})
raw = model.run(resized)
out = model.postprocess(raw, resized.shape[1:], {tuple(original.shape[1:])!r})
np.savez({str(tmp_path / "out.npz")!r}, **out)
print(model.class_names, model.resized_size(60, 80))
from PIL import Image
picture = np.asarray(Image.open({str(file)!r}).convert("RGB"))
found = model.predict(picture, score_threshold=0.05)  # resized by pillow
print(found["masks"].shape[1:] == picture.shape[:2], len(found["scores"]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "['circle', 'square', 'triangle'] (96, 128)"
    assert lines[1] == "True 20"  # model.roi_heads.detections_per_img, all above 0.05
    standalone = dict(np.load(tmp_path / "out.npz"))
    detector = Detector.from_pretrained(exported, device="cpu")
    [from_package] = detector.model([resized], output_sizes=[tuple(original.shape[1:])])
    for key in ("boxes", "scores", "labels", "masks"):
        np.testing.assert_array_equal(standalone[key], from_package[key].numpy())


def test_the_runtime_resize_follows_the_recipe_within_one_level(exported, trained):  # noqa: F811
    from trainer.onnx_model import OnnxMaskRCNN

    root, _ = trained
    runtime = OnnxMaskRCNN(exported / "model.onnx")
    transform = inference_transform([96], 200)
    for file in sorted((root / "shapes/val").glob("*.png")):
        image = read_image(file)
        for picture in (image, image[:, :, : image.shape[2] // 3], image.repeat(1, 2, 1)):
            expected = prepare_image(picture, transform)
            ours = runtime.resize(picture.permute(1, 2, 0).contiguous().numpy())
            assert ours.shape == tuple(expected.shape)
            assert np.abs(ours.astype(int) - expected.numpy().astype(int)).max() <= 1


def test_mask_pastes_equal_the_pytorch_ones():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(30, 28, 28, generator=g)
    corner = torch.rand(30, 2, generator=g) * torch.tensor([90.0, 60.0]) - 10
    size = torch.rand(30, 2, generator=g) * 50 + 0.5
    boxes = torch.cat((corner, corner + size), dim=1)
    exact = paste_masks(probs.numpy(), boxes.numpy(), 70, 100, 0.5)
    reference = torch_paste_masks(probs, boxes, 70, 100, 0.5).numpy()
    assert exact.any() and (exact != reference).mean() < 1e-4
    legacy = paste_masks_torchvision(probs.numpy(), boxes.numpy(), 70, 100, 0.5)
    reference = (paste_masks_in_image(probs[:, None], boxes, (70, 100))[:, 0] > 0.5).numpy()
    assert legacy.any() and (legacy != reference).mean() < 1e-4
    empty = np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32)
    assert paste_masks(*empty, 5, 6, 0.5).shape == (0, 5, 6)
    assert paste_masks_torchvision(*empty, 5, 6, 0.5).shape == (0, 5, 6)


def test_the_export_graph_in_pytorch_equals_the_model(trained):  # noqa: F811
    """What is exported, run eagerly: the model's own fp32 detections (needs no onnx)."""
    root, _ = trained
    detector = Detector.from_pretrained(root / "work", device="cpu", **FP32)
    wrapper = ExportableMaskRCNN(detector.model).eval()
    for min_size in SIZES:
        image = prepare_image(
            read_image(root / "shapes/val/000001.png"), inference_transform([min_size], 400)
        )
        with torch.no_grad():
            boxes, scores, labels, probs = wrapper(image)
            [reference] = detector.model([image])
        assert len(scores) > 0
        pairs = match_detections(
            {k: reference[k].numpy() for k in ("boxes", "scores", "labels")},
            {"boxes": boxes.numpy(), "scores": scores.numpy(), "labels": labels.numpy()},
        )
        order = [j for _, j in pairs]
        masks = detector.model.paste(probs[order], boxes[order], *image.shape[-2:])
        assert (masks != reference["masks"]).float().mean() < 1e-4


def test_without_onnxruntime_the_error_says_what_to_install(
    exported,
    trained,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    root, _ = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install onnxruntime"):
        Detector.from_pretrained(exported)
    argv = ["predict", "--checkpoint", str(exported / "model.onnx")]
    argv += ["--images", str(root / "shapes/val"), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        predict.cli()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: running an ONNX model needs onnxruntime")
    assert "\n" not in error

    from trainer import export

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    argv = ["export", "--checkpoint", str(root / "work"), "--out", str(tmp_path / "x")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        export.cli()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: exporting to ONNX needs onnxscript, not installed: pip install onnx "
        "onnxscript onnxruntime  (or: pip install 'trainer[export]')"
    )


def test_an_onnx_detector_is_not_saved_as_pytorch_weights(exported, tmp_path):
    detector = Detector.from_pretrained(exported / "model.onnx", device="cpu")
    with pytest.raises(ValueError, match="share its export folder"):
        detector.save_pretrained(tmp_path / "saved")


def test_evaluate_on_an_export_says_to_evaluate_its_checkpoint(exported, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--checkpoint", str(exported)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {exported}: an ONNX export, which trainer.predict and "
        "Detector.from_pretrained run; evaluate the checkpoint it was exported from."
    ]


def test_an_export_folder_needs_its_model(tmp_path):
    from trainer.export import onnx_export

    assert onnx_export(tmp_path) is None
    (tmp_path / "model.onnx").write_bytes(b"")
    assert onnx_export(tmp_path) == tmp_path / "model.onnx"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert onnx_export(tmp_path) is None  # a checkpoint folder: its PyTorch weights
    assert onnx_export(Path(tmp_path / "model.onnx")) == tmp_path / "model.onnx"


def test_a_detector_that_changes_the_inference_is_refused():
    from tests.models.conftest import small_model_config
    from trainer.config import RecipeError
    from trainer.models import MaskRCNN, build_detector

    model = build_detector(small_model_config(), num_classes=3)
    model.__class__ = type("OtherRCNN", (MaskRCNN,), {"postprocess": lambda self, *a: a})
    with pytest.raises(RecipeError, match="model.type: .*OtherRCNN"):
        ExportableMaskRCNN(model)


@pytest.mark.slow
def test_torchvision_pooling_and_paste_export(tmp_path):
    """The settings of torchvision's weights (RoIAlign not aligned, 2x2 samples, its mask
    paste), at an output size twice the input's."""
    onnx_ready()
    from tests.models.conftest import lean_model_config
    from trainer.config import load_recipe
    from trainer.export import export_onnx
    from trainer.models import build_detector
    from trainer.onnx_model import OnnxMaskRCNN
    from trainer.weights.classes import ModelClasses

    torch.manual_seed(0)
    cfg = lean_model_config(name="test_resnet")
    cfg.roi_heads.pooler_aligned = False
    cfg.roi_heads.pooler_sampling_ratio = 2
    cfg.roi_heads.mask_paste = "torchvision"
    model = build_detector(cfg, num_classes=3).eval()
    with torch.no_grad():  # detections of class 1 and masks of some size, untrained
        model.roi_heads.box_head.cls_score.bias[1] = 4.0
        model.roi_heads.mask_head.predictor.bias[:] = 0.5
    recipe = load_recipe(ROOT / "recipes/mask_rcnn.yaml", ["data.val.min_size=[120]"])
    runtime = OnnxMaskRCNN(export_onnx(model, recipe, ModelClasses(["a", "b", "c"]), tmp_path))
    g = torch.Generator().manual_seed(1)
    for height, width in ((120, 170), (150, 100)):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
        output_size = (2 * height, 2 * width)
        with torch.no_grad():
            [reference] = model([image], output_sizes=[output_size])
        out = runtime.postprocess(runtime.run(image.numpy()), (height, width), output_size)
        reference = {key: value.numpy() for key, value in reference.items()}
        pairs = match_detections(reference, out)
        assert len(pairs) > 10
        masks = np.stack([reference["masks"][i] != out["masks"][j] for i, j in pairs])
        assert masks.mean() < 1e-4
