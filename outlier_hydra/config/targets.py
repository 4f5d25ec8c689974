"""`_target_`s are code: only the project's own, and prefixes the user allows, may be imported.

A config names callables by `_target_` (the collector, the analyzer, a stage from another package).
Commands that read a saved run directory must not let that directory decide what runs, so every
`_target_` anywhere in a node (nested ones too, which instantiate would follow) is checked against
``outlier_hydra.`` and ``allowed_targets`` (prefixes such as ``my_pkg.``) before it is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from outlier_hydra.errors import OutlierHydraError

PROJECT = "outlier_hydra."


def _targets(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(key, value) of every `_target_` in a node, nested ones included."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                yield sub, v
            else:
                yield from _targets(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def check_allowed(node: Any, key: str, allowed: Sequence[str]) -> None:
    """Refuse (one line naming the key) any `_target_` in node outside the project and `allowed`."""
    for where, target in _targets(node, key):
        target = str(target)
        if not target.startswith(PROJECT) and not any(target.startswith(p) for p in allowed):
            prefix = target.split(".")[0] + "."
            raise OutlierHydraError(
                f"{where}: {target} is outside outlier_hydra; allow it explicitly with allowed_targets=[{prefix}]"
            )


def import_target(target: str, key: str, allowed: Sequence[str]) -> Any:
    check_allowed({"_target_": target}, key.removesuffix("._target_"), allowed)
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's key to fix
        reason = " ".join(str(exc).split())  # one line, whatever the importer's message
        raise OutlierHydraError(f"{key}: cannot import {target} ({reason})") from None


def check_node(node: DictConfig, key: str, allowed: Sequence[str]) -> Any:
    """The node's `_target_` is allowed, imports, and its arguments bind to its signature (before
    any weight loads). Returns the imported callable."""
    check_allowed(node, key, allowed)
    target = node.get("_target_")
    if not target:
        raise OutlierHydraError(f"{key}._target_: not set")
    obj = import_target(target, f"{key}._target_", allowed)
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    kwargs = {str(k): v for k, v in values.items() if not str(k).startswith("_")}
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as exc:
        raise OutlierHydraError(f"{key}: {target} does not take these arguments: {exc}") from None
    return obj


def instantiate_node(node: DictConfig, key: str, allowed: Sequence[str], **kwargs: Any) -> Any:
    """hydra.utils.instantiate of a checked node."""
    from hydra.utils import instantiate

    check_node(node, key, allowed)
    return instantiate(node, **kwargs)
