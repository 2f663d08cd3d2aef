"""Name -> class tables, and the one :func:`build` that makes a part from its recipe node.

Every buildable class has a classmethod ``from_config(cls, cfg, **context)`` that reads its
node (e.g. ``model.backbone``) and calls the constructor with plain values; ``context`` is
what the recipe does not hold (the class count, the parameters to optimize). Each registry
is a plain dict filled where the classes are defined. Users add their own class with the
decorator and import their module explicitly before building::

    from trainer.models import DETECTORS

    @DETECTORS.register
    class MyDetector(MaskRCNN):
        @classmethod
        def from_config(cls, cfg, num_classes=None): ...

A class we do not own is registered with its ``from_config`` function instead:
``OPTIMIZERS.register(torch.optim.SGD, from_config=sgd_from_config)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from trainer.config import RecipeError


class Registry:
    """A literal table of named classes; an unknown name is an error listing the valid ones."""

    def __init__(self, kind: str, entries: dict[str, Callable[..., Any]] | None = None):
        self.kind = kind
        self.entries: dict[str, Callable[..., Any]] = dict(entries or {})
        # from_config functions of classes registered without their own.
        self.from_configs: dict[str, Callable[..., Any]] = {}

    def register(
        self, cls: Callable[..., Any], *, from_config: Callable[..., Any] | None = None
    ) -> Callable[..., Any]:
        """Add ``cls`` under its class name (a decorator). ``from_config(cfg, **context)``, for
        a class we do not own, makes it in place of a classmethod of that name."""
        name = cls.__name__
        if name in self.entries and self.entries[name] is not cls:
            raise KeyError(f"{self.kind} '{name}' is already registered.")
        self.entries[name] = cls
        if from_config is not None:
            self.from_configs[name] = from_config
        return cls

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self.entries:
            valid = ", ".join(sorted(self.entries))
            raise RecipeError(f"unknown {self.kind} type '{name}'; valid types: {valid}.")
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries


def build(registry: Registry, node: DictConfig, type_key: str = "type", **context: Any) -> Any:
    """``node[type_key]`` names a class of ``registry``: -> that class made from ``node``
    (its ``from_config(node, **context)``). Errors are RecipeErrors naming the node's key."""
    name = node[type_key]
    try:
        cls = registry.get(name)
    except RecipeError as exc:
        raise RecipeError(f"{_where(node, type_key)}: {exc}") from None
    make = registry.from_configs.get(name) or getattr(cls, "from_config", None)
    if make is None:
        raise TypeError(f"{registry.kind} {name} has no from_config(cfg, **context).")
    return _named(make, node, context)


def build_part(cls: type, node: DictConfig, **context: Any) -> Any:
    """``cls.from_config(node, **context)`` for a part whose class the recipe does not choose
    (e.g. the RPN of a detector), with errors named as in :func:`build`."""
    return _named(cls.from_config, node, context)


def _named(make: Callable[..., Any], node: DictConfig, context: dict) -> Any:
    # Parts raise plain ValueErrors about their own arguments; the user is told where in
    # the recipe those came from. The innermost node names it; outer builds pass it on.
    try:
        return make(node, **context)
    except RecipeError:
        raise
    except ValueError as exc:
        where = _where(node)
        raise RecipeError(f"{where}: {exc}" if where else str(exc)) from exc


def _where(node: DictConfig, key: str | None = None) -> str:
    """Dotted key of ``node`` (or of its ``key``) in the recipe, e.g. ``model.backbone``;
    "" for a root node without ``key``."""
    return node._get_full_key(key)
