"""The recipe as it is written into artifacts: ``work_dir/config.yaml``, every checkpoint's
``config.yaml`` and weights metadata, and the trackers' run config.

Every interpolation is resolved except those that read the environment (``${oc.env:NAME}``,
directly or through other keys): those keep their text, so that a token or a machine's path
passed by environment variable is used by the run but never written down. A recipe read back
from an artifact resolves them again from the environment it then runs in.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

_READS_ENVIRONMENT = re.compile(r"\$\{\s*oc\.env\s*:")
# ${key.path}, ${.sibling}, ${..parent_sibling}: a reference to another value of the recipe.
_REFERENCE = re.compile(r"\$\{\s*(\.*)([A-Za-z_][\w.\[\]]*)\s*\}")


def saved_recipe(cfg: DictConfig) -> dict:
    """Plain containers: resolved values, and the interpolation text where a value comes
    from the environment."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return _merge(raw, resolved, raw, [])


def saved_recipe_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(saved_recipe(cfg)))


def _merge(raw: Any, resolved: Any, root: dict, path: list) -> Any:
    if isinstance(raw, dict) and isinstance(resolved, dict):
        return {key: _merge(raw[key], resolved[key], root, [*path, key]) for key in raw}
    if isinstance(raw, list) and isinstance(resolved, list):
        return [_merge(r, v, root, [*path, i]) for i, (r, v) in enumerate(zip(raw, resolved))]
    if _reads_environment(raw, root, path[:-1], set()):
        return raw
    return resolved


def _reads_environment(value: Any, root: dict, parent: list, seen: set) -> bool:
    """Whether ``value`` (the raw text of a key under ``parent``) takes anything from the
    environment, itself or through the keys it refers to."""
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return any(_reads_environment(v, root, [*parent, k], seen) for k, v in items)
    if not isinstance(value, str) or "${" not in value:
        return False
    if _READS_ENVIRONMENT.search(value):
        return True
    for dots, name in _REFERENCE.findall(value):
        base = parent[: len(parent) - (len(dots) - 1)] if dots else []
        target = [*base, *name.split(".")]
        key = tuple(target)
        if key in seen:
            continue
        seen.add(key)
        node = _lookup(root, target)
        if node is not None and _reads_environment(node, root, target[:-1], seen):
            return True
    return False


def _lookup(root: Any, path: list) -> Any:
    node = root
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and str(key).isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node
