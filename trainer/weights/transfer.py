"""Initialise a detector from trained weights, keeping what it knew about each class.

The class-specific rows (classifier, box regression, mask logits; layout in
``trainer.weights.source``) are copied by class name: for a model of classes ``[person,
dog, kayak]`` from COCO weights, the rows of "person" and "dog" come from COCO's rows of
those names, and "kayak" keeps a fresh initialisation. The background row is always copied.
Everything else is copied where the name and shape agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trainer.weights.source import CLASS_SPECIFIC, PLACEHOLDER_CLASSES, SourceWeights

CLS_SCORE = "roi_heads.box_head.cls_score"
BBOX_PRED = "roi_heads.box_head.bbox_pred"
MASK_PREDICTOR = "roi_heads.mask_head.predictor"


@dataclass
class TransferReport:
    """What :func:`transfer_weights` did, by parameter name.

    loaded: copied as they are; class_rows: class-specific tensors filled row by row;
    reinitialised: (name, why) kept at their fresh initialisation; missing: in the model,
    not in the source; unused: in the source, not in the model; kept_classes: the model's
    classes whose rows came from the source; new_classes: the others.
    """

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    class_rows: list[str] = field(default_factory=list)
    reinitialised: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    kept_classes: list[str] = field(default_factory=list)
    new_classes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """One table: a row per outcome with its count and examples."""

        def examples(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")

        rows = [
            ("loaded", len(self.loaded), examples(self.loaded)),
            ("class rows by name", len(self.class_rows), self._class_summary()),
            (
                "reinitialised",
                len(self.reinitialised),
                examples([f"{name} ({why})" for name, why in self.reinitialised]),
            ),
            ("missing in source", len(self.missing), examples(self.missing)),
            ("unused from source", len(self.unused), examples(self.unused)),
        ]
        width = max(len(row[0]) for row in rows)
        lines = [f"weights from {self.source} ({self.format} format):"]
        lines += [f"  {name:<{width}}  {count:>5}  {detail}" for name, count, detail in rows]
        return "\n".join(lines)

    def _class_summary(self) -> str:
        if not self.class_rows:
            return ""
        kept = f"{len(self.kept_classes)} classes kept ({', '.join(self.kept_classes[:6])}"
        kept += ", ...)" if len(self.kept_classes) > 6 else ")"
        if self.new_classes:
            kept += f"; {len(self.new_classes)} new ({', '.join(self.new_classes[:6])}"
            kept += ", ...)" if len(self.new_classes) > 6 else ")"
        return kept


def _normalise(name: str) -> str:
    return name.strip().lower()


def match_classes(source: list[str], target: list[str]) -> dict[int, int]:
    """Target label -> source label (both 1-based) for classes with the same name (case and
    surrounding spaces ignored; placeholders such as "N/A" never match)."""
    by_name: dict[str, int] = {}
    for label, name in enumerate(source, start=1):
        if name not in PLACEHOLDER_CLASSES:
            by_name.setdefault(_normalise(name), label)
    return {
        label: by_name[_normalise(name)]
        for label, name in enumerate(target, start=1)
        if _normalise(name) in by_name
    }


def _copy_class_rows(key: str, fresh: Tensor, source: Tensor, pairs: dict[int, int]) -> Tensor:
    """``fresh`` with the rows of matched classes (and the background) taken from ``source``."""
    out = fresh.clone()
    if key.startswith(MASK_PREDICTOR):  # K rows, label k at row k - 1
        rows = [(t - 1, s - 1) for t, s in pairs.items()]
        width = 1
    else:  # K + 1 rows (x 4 for boxes), background first
        rows = [(0, 0)] + list(pairs.items())
        width = 4 if key.startswith(BBOX_PRED) else 1
    for target_row, source_row in rows:
        out[target_row * width : (target_row + 1) * width] = source[
            source_row * width : (source_row + 1) * width
        ]
    return out


def transfer_weights(
    model: nn.Module, source: SourceWeights, classes: list[str] | None
) -> TransferReport:
    """Load ``source`` into ``model`` (whose labels 1..K are ``classes``) as far as it fits.

    Tensors of the same name and shape are copied; class-specific ones are copied by class
    name when both sides name their classes (in any order, any count), else as they are when
    their shapes agree. Parameters the source lacks keep the model's initialisation.
    ``num_batches_tracked`` counters are left out of the report (frozen BatchNorm has none).
    """
    report = TransferReport(source.path, source.format)
    target = model.state_dict()
    # Same classes in the same order (placeholders included): the rows are copied as they are.
    same = source.classes is not None and classes is not None and source.classes == classes
    by_name = bool(source.classes) and bool(classes) and not same
    pairs = match_classes(source.classes, classes) if by_name else {}
    if by_name:
        report.kept_classes = [classes[t - 1] for t in sorted(pairs)]
        report.new_classes = [name for t, name in enumerate(classes, 1) if t not in pairs]
    new_state: dict[str, Tensor] = {}
    for key, fresh in target.items():
        if key.endswith("num_batches_tracked"):
            continue
        value = source.state_dict.get(key)
        if value is None:
            report.missing.append(key)
            continue
        value = torch.as_tensor(value)
        if key in CLASS_SPECIFIC and by_name:
            new_state[key] = _copy_class_rows(key, fresh, value.to(fresh.dtype), pairs)
            report.class_rows.append(key)
        elif value.shape == fresh.shape:
            new_state[key] = value.to(fresh.dtype)
            report.loaded.append(key)
        else:
            why = f"shape {tuple(value.shape)} in source, {tuple(fresh.shape)} here"
            report.reinitialised.append((key, why))
    report.unused = [
        key
        for key in source.state_dict
        if key not in target and not key.endswith("num_batches_tracked")
    ] + list(source.unused)
    model.load_state_dict(new_state, strict=False)
    return report
