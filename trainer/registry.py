"""Name -> class tables behind the ``build_*`` functions.

Each registry is a plain dict filled where the classes are defined. Users add their own
class with the decorator and import their module explicitly before building::

    from trainer.models import DETECTORS

    @DETECTORS.register
    class MyDetector(MaskRCNN): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer.config import RecipeError


class Registry:
    """A literal table of named classes; an unknown name is an error listing the valid ones."""

    def __init__(self, kind: str, entries: dict[str, Callable[..., Any]] | None = None):
        self.kind = kind
        self.entries: dict[str, Callable[..., Any]] = dict(entries or {})

    def register(self, cls: Callable[..., Any]) -> Callable[..., Any]:
        name = cls.__name__
        if name in self.entries and self.entries[name] is not cls:
            raise KeyError(f"{self.kind} '{name}' is already registered.")
        self.entries[name] = cls
        return cls

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self.entries:
            valid = ", ".join(sorted(self.entries))
            raise RecipeError(f"unknown {self.kind} type '{name}'; valid types: {valid}.")
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries
