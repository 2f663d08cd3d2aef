"""``Detector``: a trained model used from Python, saved and shared on the Hugging Face Hub.

from trainer import Detector

detector = Detector.from_pretrained("work_dirs/demo")          # or "owner/repo" on the Hub
results = detector.predict(["a.jpg", "b.jpg"], score_threshold=0.5)
for box, label in zip(results[0]["boxes"], results[0]["labels"]):
    print(detector.classes[label - 1], box.tolist())
detector.save_pretrained("my_detector")                        # from_pretrained reads it back
detector.push_to_hub("owner/my-detector")
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from trainer.data.inference_images import inference_transform, prepare_image, to_image_tensor
from trainer.engine.checkpoint import export_weights
from trainer.saved_recipe import saved_recipe_yaml
from trainer.weights.classes import ModelClasses
from trainer.weights.pretrained import build_pretrained, pretrained_classes, pretrained_recipe
from trainer.weights.read import read_weights

MODEL_CARD = """---
library_name: trainer
tags:
- instance-segmentation
- mask-rcnn
---

# {name}

Mask R-CNN with a `{backbone}` backbone, {count} classes: {classes}.

```python
from trainer import Detector

detector = Detector.from_pretrained("{repo}")
results = detector.predict(["image.jpg"])  # boxes, scores, labels (1..K), masks per image
names = [detector.classes[label - 1] for label in results[0]["labels"]]
```

Files: `model.safetensors` (weights), `config.yaml` (the training recipe),
`classes.json` (the class names and their category ids).
"""


class Detector:
    """A trained instance segmentation model with its recipe and class names.

    Attributes: ``model`` (the nn.Module, in eval mode), ``cfg`` (the resolved recipe),
    ``classes`` (names of labels 1..K), ``device``.
    """

    def __init__(self, model: nn.Module, cfg: DictConfig, classes: ModelClasses, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.model_classes = classes
        self.transform = inference_transform(cfg.data.val.min_size, cfg.data.val.max_size)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        recipe: str | Path | None = None,
        classes: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> Detector:
        """Load a detector.

        Args:
            source: a work_dir (its latest checkpoint), a checkpoint folder, a weights file
                (this project's, or torchvision's / detectron2's / mmdetection's Mask R-CNN),
                a folder written by :meth:`save_pretrained`, an http(s) URL or a Hugging
                Face Hub repo id; or an ONNX export (``model.onnx`` or its folder, from
                ``python -m trainer.export``), run with onnxruntime.
            recipe: the recipe describing the model; needed only for weights that do not
                carry one (other frameworks' weights, older checkpoints).
            classes: class names of labels 1..K, for weights that do not name them.
            device: where to run (default: CUDA when available, else the CPU).
            overrides: recipe values by dotted key, e.g.
                ``Detector.from_pretrained(path, **{"data.val.min_size": [640]})``.
        """
        from trainer.export import load_onnx, onnx_export

        items = [f"{key}={_yaml(value)}" for key, value in overrides.items()]
        onnx_path = onnx_export(source)
        if onnx_path is not None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            names = list(classes) if classes else None
            model, cfg, model_classes = load_onnx(onnx_path, recipe, items, names, device)
            return cls(model, cfg, model_classes, device)
        weights = read_weights(source)
        cfg = pretrained_recipe(weights, recipe, items)
        model_classes = pretrained_classes(weights, cfg, list(classes) if classes else None)
        model = build_pretrained(weights, cfg, model_classes)
        return cls(model, cfg, model_classes, device)

    @property
    def runs_onnx(self) -> bool:
        """Whether the model is an ONNX export run by onnxruntime."""
        return not isinstance(self.model, nn.Module)

    @property
    def classes(self) -> list[str]:
        """Names of labels 1..K: ``classes[label - 1]`` names a detection."""
        return list(self.model_classes.names)

    @torch.inference_mode()
    def predict(
        self, images: Any, score_threshold: float = 0.5, batch_size: int = 1
    ) -> list[dict[str, Tensor]]:
        """Detect instances.

        Args:
            images: one image or a list; each a path, a PIL image, an H x W x 3 uint8 numpy
                array (RGB) or a [3, H, W] tensor (uint8, or float in [0, 1]).
            score_threshold: keep detections scoring at least this.
            batch_size: images per forward pass (results do not depend on it beyond float
                rounding of the padded batch).
        Returns:
            per image a dict: ``boxes`` [D, 4] xyxy in the image's pixels, ``scores`` [D],
            ``labels`` [D] in 1..K, ``masks`` [D, H, W] bool at the image's size; on the CPU.
        """
        single = not isinstance(images, list | tuple)
        tensors = [to_image_tensor(image) for image in ([images] if single else images)]
        results = []
        for start in range(0, len(tensors), max(1, batch_size)):
            chunk = tensors[start : start + batch_size]
            resized = [prepare_image(image, self.transform).to(self.device) for image in chunk]
            sizes = [tuple(image.shape[-2:]) for image in chunk]
            with self._keeping_scores(score_threshold):
                outputs = self.model(resized, output_sizes=sizes)
            for output in outputs:
                keep = output["scores"] >= score_threshold
                results.append({key: value[keep].cpu() for key, value in output.items()})
        return results[0] if single else results

    def _keeping_scores(self, at_least: float):
        """The PyTorch model makes masks only for detections it keeps (an export: all)."""
        keeping = getattr(self.model, "keeping_scores", None)
        return keeping(at_least) if keeping else contextlib.nullcontext()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.yaml``, ``classes.json`` and a README model
        card into ``folder``: :meth:`from_pretrained` needs nothing else."""
        if self.runs_onnx:
            raise ValueError(
                f"this detector runs the ONNX model '{self.model.runtime.path}': share its "
                "export folder as it is (save_pretrained writes PyTorch weights)."
            )
        folder = Path(folder)
        recipe_yaml = saved_recipe_yaml(self.cfg)
        export_weights(folder, self.model.state_dict(), recipe_yaml, {}, self.model_classes)
        (folder / "README.md").write_text(self._model_card(folder.name, folder.name))
        return folder

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | None = None
    ) -> str:
        """Upload what :meth:`save_pretrained` writes to the Hub repo ``repo_id`` (created
        when missing); returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            (folder / "README.md").write_text(self._model_card(repo_id.split("/")[-1], repo_id))
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder))
        return str(info)

    def _model_card(self, name: str, repo: str) -> str:
        names = self.classes
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return MODEL_CARD.format(
            name=name,
            backbone=self.cfg.model.backbone.name,
            count=len(names),
            classes=shown,
            repo=repo,
        )

    def __repr__(self) -> str:
        runtime = ", onnxruntime" if self.runs_onnx else ""
        return (
            f"Detector({self.cfg.model.backbone.name}, {len(self.classes)} classes, "
            f"device={self.device}{runtime})"
        )


def _yaml(value: Any) -> str:
    """A Python value as an override's right-hand side."""
    return value if isinstance(value, str) else json.dumps(value)
