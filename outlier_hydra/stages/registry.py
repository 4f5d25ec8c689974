"""Which stages exist, which are configured, and which run where: the one place that asks a stage's phase.

Built-in stages are found by scanning this package (a module or subpackage defining a Stage subclass),
so nothing else names them. A stage from another package is named by ``_target_`` in its node
(allowed through ``allowed_targets``). A run's stages are one :class:`StageSet`: the runner, the result
documents, saved runs and the benchmark ask it for the collecting and post stages and their
statistics classes, in configuration order.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any

from outlier_hydra.errors import OutlierHydraError, first_line
from outlier_hydra.stages.protocol import COLLECT, POST, Stage


class StageSet(list):
    """The enabled stages of a run, in configuration order (a list of Stage that knows their phases)."""

    def __init__(self, stages: Iterable[Stage] = ()):
        super().__init__(stages)

    @property
    def collecting(self) -> StageSet:
        """The stages that hook the collection passes."""
        return StageSet(s for s in self if s.phase == COLLECT)

    @property
    def post(self) -> StageSet:
        """The stages that run after the criteria, with passes of their own."""
        return StageSet(s for s in self if s.phase == POST)

    @property
    def stats_classes(self) -> dict[str, type]:
        """name -> statistics class of the collecting stages that keep statistics (what a batch file may hold)."""
        return {s.name: s.Stats for s in self.collecting if s.Stats is not None}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self]

    def bound(self, structure, layers: list[int]) -> StageSet:
        """The stages that apply to this model (Stage.bind), bound to it."""
        return StageSet(s for s in self if s.bind(structure, layers))


def builtin_stages() -> dict[str, type[Stage]]:
    """name -> class of every stage defined in this package (each module imported once)."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")
    return {cls.name: cls for cls in _subclasses(Stage) if cls.__module__.startswith(__package__ + ".")}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def stage_class(name: str, node: Any, allowed: list[str]) -> type[Stage]:
    """The class of stage `name`: a built-in one, or the allowed `_target_` its node names."""
    key = f"analysis.stages.{name}"
    target = node.get("_target_") if node is not None else None
    if target:
        from outlier_hydra.config.targets import import_target

        cls = import_target(str(target), f"{key}._target_", allowed)
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise OutlierHydraError(f"{key}._target_: {target} is not a Stage (outlier_hydra.stages.Stage)")
        if cls.name != name:
            raise OutlierHydraError(f"{key}: {target} is the stage {cls.name!r}; configure it as analysis.stages.{cls.name}")
        return cls
    known = builtin_stages()
    if name not in known:
        raise OutlierHydraError(
            f"{key}: no stage named {name!r} (stages: {', '.join(sorted(known))}; a stage of your own needs _target_)"
        )
    return known[name]


def typed_settings(cls: type[Stage], node: Any, key: str):
    """The node merged into the stage's Config: a wrong type or unknown key is one line naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    values = {k: v for k, v in dict(node).items() if k != "_target_"}
    try:
        return OmegaConf.merge(OmegaConf.structured(cls.Config), values)
    except OmegaConfBaseException as exc:
        where = f"{key}.{exc.full_key}" if getattr(exc, "full_key", None) else key
        raise OutlierHydraError(f"{where}: {first_line(exc)}") from None


def build_stages(stages_cfg: Any, allowed: list[str]) -> StageSet:
    """The enabled stages, in configuration order (null or enabled=false: off)."""
    out = []
    for name, node in (stages_cfg or {}).items():
        if node is None:
            continue
        cls = stage_class(str(name), node, allowed)
        settings = typed_settings(cls, node, f"analysis.stages.{name}")
        if settings.enabled:
            out.append(cls(settings))
    return StageSet(out)
