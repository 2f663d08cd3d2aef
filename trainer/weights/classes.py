"""The classes a model was trained on, stored beside its weights as ``classes.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CLASSES_FILE = "classes.json"


@dataclass
class ModelClasses:
    """names: label k in 1..K is ``names[k - 1]``; category_ids: the annotation file's
    category id of each label (None when the classes came without ids); has_masks: whether
    the mask head was trained (False for a boxes-only training set)."""

    names: list[str]
    category_ids: list[int] | None = None
    has_masks: bool = True

    def __post_init__(self):
        if self.category_ids is not None and len(self.category_ids) != len(self.names):
            raise ValueError(
                f"{len(self.names)} class names but {len(self.category_ids)} category ids."
            )

    @classmethod
    def of_dataset(cls, dataset) -> ModelClasses:
        """From a DetectionDataset's ``CLASSES``, ``label_to_cat`` and ``has_masks``."""
        names = list(dataset.CLASSES)
        label_to_cat = getattr(dataset, "label_to_cat", None)
        ids = [int(label_to_cat[k]) for k in range(1, len(names) + 1)] if label_to_cat else None
        return cls(names, ids, bool(getattr(dataset, "has_masks", True)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "classes.json") -> ModelClasses:
        try:
            data = json.loads(text)
            return cls(list(data["names"]), data.get("category_ids"), data.get("has_masks", True))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source} is not a class list ({exc}).") from None

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CLASSES_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ModelClasses | None:
        """The class list in ``folder``, or None when it has none."""
        path = Path(folder) / CLASSES_FILE
        return cls.from_json(path.read_text(), str(path)) if path.is_file() else None

    @property
    def label_to_cat(self) -> dict[int, int]:
        """Label (1..K) -> category id (the label itself when there are no ids)."""
        ids = self.category_ids or list(range(1, len(self.names) + 1))
        return {label: cat for label, cat in enumerate(ids, start=1)}
