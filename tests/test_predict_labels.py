"""predict's --no-labels and --no-scores: overlays with less text, on untrained weights."""

from __future__ import annotations

import json

import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.io import decode_image

from tests.evaluation.test_evaluate_cli import DEMO, tiny  # noqa: F401 (a fixture)
from tests.test_visualize_labels import _outlines
from trainer import predict


def _overlays(root, overrides, out: str, *flags: str) -> tuple[list[dict], dict]:
    args = [DEMO, "--checkpoint", str(root / "weights.safetensors"), "--out", str(root / out)]
    images = root / "shapes/val"
    predict.main([*args, "--images", str(images), "--score-threshold", "0.05", *flags, *overrides])
    results = json.loads((root / out / "predictions.json").read_text())
    overlays = {
        path.name: decode_image(str(path)) for path in sorted((root / out / "overlays").iterdir())
    }
    return results, overlays


def test_label_switches(tiny):  # noqa: F811
    root, overrides = tiny
    results, full = _overlays(root, overrides, "full")
    _, bare = _overlays(root, overrides, "bare", "--no-labels")
    _, names = _overlays(root, overrides, "names", "--no-scores")
    if not results:
        pytest.skip("the untrained model detected nothing")
    for name, image_path in ((n, root / "shapes/val" / n) for n in bare):
        image = decode_image(str(image_path))
        own = [r for r in results if r["file_name"] == name]
        drawn = torch.zeros(image.shape[1:], dtype=torch.bool)
        for r in own:
            drawn |= torch.from_numpy(mask_utils.decode(r["segmentation"])).bool()
        boxes = torch.tensor([r["bbox"] for r in own]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        drawn |= _outlines(boxes, *image.shape[1:], line=1)
        # Boxes in the file are rounded to 0.01 px: an outline may fall 1 px off.
        drawn = torch.nn.functional.max_pool2d(drawn[None].float(), 3, 1, 1)[0].bool()
        # No text: only masks and outlines change the image.
        assert not ((bare[name] != image).any(0) & ~drawn).any()
    # Three classes: names without scores, names with scores, nothing: all differ.
    labelled = [n for n in bare if not torch.equal(full[n], bare[n])]
    assert labelled
    for n in labelled:
        assert not torch.equal(names[n], bare[n]) and not torch.equal(names[n], full[n])
