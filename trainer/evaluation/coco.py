"""COCO box and mask evaluation with pycocotools (or faster-coco-eval, same numbers).

:class:`CocoEvaluator` converts model outputs into COCO result dicts as soon as they arrive (masks
become RLE per image), so full-resolution masks never pile up in memory. :meth:`evaluate`
gathers the results of all Accelerate processes, drops repeated images, scores them with
``COCOeval`` on the main process only and broadcasts the metrics back to every process.

Metrics are ``COCOeval.stats[0:6]`` as fractions in [0, 1], named ``{iou_type}/{AP,AP50,AP75,
APs,APm,APl}``; on request also per class, ``{iou_type}/AP/{class}`` and
``{iou_type}/AP50/{class}``.
As in pycocotools, a metric whose area range (or class) has no ground truth among the evaluated
images is -1; it is passed through (not NaN, so metrics stay JSON-serialisable) and the tables
show it as "-".

:meth:`CocoEvaluator.write_results` writes the results scored for each iou type as
``{bbox,segm}_predictions.json``: plain pycocotools (``COCO.loadRes`` + ``COCOeval``) scores
each to exactly the metrics logged. ``predictions.json``, every result with its box and mask,
scores the same for bbox but not for segm sizes: ``loadRes`` then takes box areas.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.evaluation.results import category_lookup, task_results, to_coco_results

IOU_TYPES = ("bbox", "segm")
# Names of COCOeval.stats[0:6], in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Per-class metrics: AP over IoU 0.50:0.95 and AP at IoU 0.5, all areas, 100 detections.
PER_CLASS_NAMES = ("AP", "AP50")
# faster-coco-eval reimplements COCOeval's matching and accumulation in C++.
BACKENDS = ("pycocotools", "faster-coco-eval")


def _cell(value: float) -> str:
    return f"{100 * value:>7.1f}" if value >= 0 else f"{'-':>7}"


def summary_table(metrics: dict[str, float]) -> str:
    """Aligned text table of ``metrics`` (as from :meth:`CocoEvaluator.evaluate`) in percent.

    One row per iou type present in ``metrics``, columns AP AP50 AP75 APs APm APl; -1 ("no
    ground truth in this size range") is shown as "-".
    """
    lines = [f"{'':<6}" + "".join(f"{name:>7}" for name in METRIC_NAMES)]
    for iou_type in (t for t in IOU_TYPES if f"{t}/AP" in metrics):
        values = (metrics[f"{iou_type}/{name}"] for name in METRIC_NAMES)
        lines.append(f"{iou_type:<6}" + "".join(_cell(v) for v in values))
    return "\n".join(lines)


def per_class_table(metrics: dict[str, float]) -> str:
    """Aligned text table of the per-class metrics in ``metrics`` (from
    ``evaluate(per_class=True)``) in percent: one row per class, in label order, columns
    ``{iou_type} AP`` and ``{iou_type} AP50``; -1 (no ground truth of the class) is "-".
    """
    columns = [
        (iou_type, name)
        for iou_type in IOU_TYPES
        for name in PER_CLASS_NAMES
        if any(key.startswith(f"{iou_type}/{name}/") for key in metrics)
    ]
    classes: dict[str, None] = {}  # ordered set: keys keep the evaluator's label order
    for key in metrics:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[1] in PER_CLASS_NAMES:
            classes[parts[2]] = None
    if not classes:
        raise ValueError("metrics hold no per-class values: use evaluate(per_class=True)")
    width = max(len("class"), *(len(name) for name in classes))
    header = f"{'class':<{width}}" + "".join(f"{f'{t} {n}':>11}" for t, n in columns)
    lines = [header]
    for name in classes:
        cells = "".join(f"{_cell(metrics.get(f'{t}/{n}/{name}', -1.0)):>11}" for t, n in columns)
        lines.append(f"{name:<{width}}" + cells)
    return "\n".join(lines)


def _coco_api(backend: str) -> tuple[type, type]:
    """(COCO, COCOeval) classes of a backend."""
    if backend == "pycocotools":
        return COCO, COCOeval
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        raise ImportError(
            "the faster-coco-eval backend needs its package: pip install faster-coco-eval"
        ) from None
    return FasterCOCO, COCOeval_faster


class CocoEvaluator:
    """Accumulates detections per image and scores them against a COCO ground truth.

    Args:
        coco_gt: ground truth; its images must carry ``height`` and ``width``.
        label_to_cat_id: model label (contiguous 1..K) -> category id of the annotation file.
        iou_types: any of ``"bbox"``, ``"segm"``.
        accelerator: when given with ``num_processes > 1``, results are gathered across
            processes in :meth:`evaluate`; every process must then call it.
        backend: ``"pycocotools"`` or ``"faster-coco-eval"`` (same metrics, computed faster).
    """

    summary_table = staticmethod(summary_table)
    per_class_table = staticmethod(per_class_table)

    def __init__(
        self,
        coco_gt: COCO,
        label_to_cat_id: dict[int, int],
        iou_types: tuple[str, ...] = IOU_TYPES,
        accelerator: Accelerator | None = None,
        backend: str = "pycocotools",
    ):
        unknown = set(iou_types) - set(IOU_TYPES)
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}: {iou_types}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown evaluation backend '{backend}': use one of {BACKENDS}")
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        self.accelerator = accelerator
        self.backend = backend
        self._cat_lookup = category_lookup(label_to_cat_id)
        self.class_names = self._class_names(coco_gt, label_to_cat_id)
        # The ground truth in the backend's own COCO class, built on first use.
        self._backend_gt: Any = None
        self.reset()

    @classmethod
    def for_dataset(
        cls, dataset, accelerator: Accelerator | None = None, backend: str = "pycocotools"
    ) -> CocoEvaluator:
        """The evaluator of a detection dataset: its ``coco`` ground truth, ``label_to_cat``
        map and the ``iou_types`` its annotations support."""
        return cls(
            dataset.coco,
            dataset.label_to_cat,
            iou_types=dataset.iou_types,
            accelerator=accelerator,
            backend=backend,
        )

    @staticmethod
    def _class_names(coco_gt: COCO, label_to_cat_id: dict[int, int]) -> dict[int, str]:
        """category id -> name used in per-class metric keys, in label order; a repeated name
        gets its category id appended so that no two classes share a key."""
        cats = [label_to_cat_id[label] for label in sorted(label_to_cat_id)]
        names = [coco_gt.cats[cat].get("name", str(cat)) for cat in cats]
        return {
            cat: name if names.count(name) == 1 else f"{name} (id {cat})"
            for cat, name in zip(cats, names, strict=True)
        }

    def reset(self) -> None:
        """Forget everything processed so far."""
        # image id -> that image's COCO results; keyed by id so a repeated image is kept once.
        self._results: dict[int, list[dict[str, Any]]] = {}
        # Results of all processes, set by evaluate() and invalidated by process().
        self._gathered: dict[int, list[dict[str, Any]]] | None = None

    def process(self, image_ids: list[int], outputs: list[dict[str, torch.Tensor]]) -> None:
        """Convert one batch of detections to COCO results and keep only those.

        ``outputs[i]`` belongs to ``image_ids[i]`` and holds, at the original image size:
        ``boxes`` float [D, 4] xyxy pixels, ``labels`` int64 [D] in 1..K, ``scores`` float [D]
        and, when "segm" is evaluated, ``masks`` bool [D, H, W]. An image with D = 0 still
        counts as evaluated. An image id seen before is skipped (distributed padding).
        """
        for image_id, output in zip(image_ids, outputs, strict=True):
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"image id {image_id} is not in the ground truth")
            if image_id not in self._results:
                self._results[image_id] = self._to_coco(image_id, output)
        self._gathered = None

    def _to_coco(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One image's output -> COCO result dicts (image_id, category_id, bbox xywh, score
        and, for "segm", segmentation as compressed RLE with str counts)."""
        with_masks = "segm" in self.iou_types
        if with_masks and len(output["scores"]):
            masks = output["masks"]
            image = self.coco_gt.imgs[image_id]
            expected = (len(output["scores"]), image["height"], image["width"])
            if masks.dtype != torch.bool or tuple(masks.shape) != expected:
                raise ValueError(
                    f"image {image_id}: masks must be bool {list(expected)}, "
                    f"got {masks.dtype} {list(masks.shape)}"
                )
        results = to_coco_results(output, self._cat_lookup, with_masks)
        return [{"image_id": image_id, **result} for result in results]

    @property
    def _distributed(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    def _all_results(self) -> dict[int, list[dict[str, Any]]]:
        """image id -> results over all processes, gathered once (a collective when distributed)."""
        if self._gathered is None:
            if self._distributed:
                # gather_object concatenates each process' list; (id, results) pairs keep every
                # image's results together so repeats can be dropped whole.
                self._gathered = {}
                for image_id, results in gather_object(list(self._results.items())):
                    # Distributed samplers pad the last batch with repeated images: keep one copy.
                    self._gathered.setdefault(image_id, results)
            else:
                self._gathered = self._results
        return self._gathered

    def evaluate(self, per_class: bool = False) -> dict[str, float]:
        """Score everything processed (on every process, when distributed).

        Returns ``{"bbox/AP": ..., "segm/APl": ...}`` for the configured iou types, fractions in
        [0, 1] or -1 (no ground truth in that size range); all 0.0 when there are no detections.
        ``per_class`` adds ``{iou_type}/AP/{class}`` and ``{iou_type}/AP50/{class}`` for every
        class in label order (-1: no ground truth of the class); see :func:`per_class_table`.
        Only the processed images are scored, so a partial evaluation is judged on those alone.
        """
        per_image = self._all_results()
        metrics = None
        if self.accelerator is None or self.accelerator.is_main_process:
            metrics = self._score(per_image, per_class)
        if self._distributed:
            metrics = broadcast_object_list([metrics])[0]
        return metrics

    def _ground_truth(self) -> Any:
        if self.backend == "pycocotools":
            return self.coco_gt
        if self._backend_gt is None:
            # A deep copy: evaluation writes into the annotation dicts it is given.
            coco_cls, _ = _coco_api(self.backend)
            self._backend_gt = coco_cls(self.coco_gt.dataset, use_deepcopy=True)
        return self._backend_gt

    def _score(
        self, per_image: dict[int, list[dict[str, Any]]], per_class: bool
    ) -> dict[str, float]:
        results = [result for image_results in per_image.values() for result in image_results]
        if not results:
            # COCO.loadRes cannot load an empty result list.
            names = list(METRIC_NAMES)
            if per_class:
                names += [f"{n}/{c}" for n in PER_CLASS_NAMES for c in self.class_names.values()]
            return {f"{t}/{name}": 0.0 for t in self.iou_types for name in names}
        _, cocoeval_cls = _coco_api(self.backend)
        coco_gt = self._ground_truth()
        metrics = {}
        for iou_type in self.iou_types:
            # Each iou type is scored on copies with only its own geometry (as detectron2
            # does): exactly what {iou_type}_predictions.json holds, so rescoring that file
            # with plain pycocotools gives these numbers.
            dets = task_results(results, iou_type)
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval = cocoeval_cls(coco_gt, coco_gt.loadRes(dets), iou_type)
                coco_eval.params.imgIds = sorted(per_image)
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
            stats = coco_eval.stats[: len(METRIC_NAMES)]
            metrics.update(
                {
                    f"{iou_type}/{name}": float(v)
                    for name, v in zip(METRIC_NAMES, stats, strict=True)
                }
            )
            if per_class:
                metrics.update(self._per_class(coco_eval, iou_type))
        return metrics

    def _per_class(self, coco_eval: Any, iou_type: str) -> dict[str, float]:
        """Per-class AP and AP50 from COCOeval's precision array, averaged the way
        ``COCOeval.summarize`` averages over all classes (entries of -1 left out)."""
        # precision: [iou thresholds, recall thresholds, classes, area ranges, max detections];
        # area range 0 is "all", the last max-detections setting is 100.
        precision = np.asarray(coco_eval.eval["precision"])[:, :, :, 0, -1]
        column = {cat: k for k, cat in enumerate(coco_eval.params.catIds)}
        metrics = {}
        for cat, name in self.class_names.items():
            k = column[cat]
            for metric, values in (("AP", precision[:, :, k]), ("AP50", precision[0, :, k])):
                valid = values[values > -1]
                metrics[f"{iou_type}/{metric}/{name}"] = float(valid.mean()) if valid.size else -1.0
        return metrics

    def results(self, iou_type: str | None = None) -> list[dict[str, Any]]:
        """COCO result dicts: after :meth:`evaluate` those of all processes (every process
        holds them), before it this process' own.

        Without ``iou_type``, each result has its box and (for "segm") its mask, as
        predictions.json holds them; with it, copies with only that task's geometry, the
        results :meth:`evaluate` scored for it (see :func:`task_results`).
        """
        per_image = self._gathered if self._gathered is not None else self._results
        results = [result for image_results in per_image.values() for result in image_results]
        return results if iou_type is None else task_results(results, iou_type)

    def write_results(self, folder: str | Path) -> list[Path]:
        """Write ``predictions.json`` (every result with its box and mask) and, per evaluated
        iou type, ``{iou_type}_predictions.json`` (that task's results alone, which plain
        ``COCO.loadRes`` + ``COCOeval`` score to the numbers of :meth:`evaluate`) into
        ``folder``; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = {"predictions.json": self.results()}
        written.update({f"{t}_predictions.json": self.results(t) for t in self.iou_types})
        for name, results in written.items():
            (folder / name).write_text(json.dumps(results))
        return [folder / name for name in written]

    @property
    def predictions(self) -> list[dict[str, Any]]:
        """Same as :meth:`results`."""
        return self.results()
