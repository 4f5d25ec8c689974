"""The subcommands' arguments: paths, Hydra-style key=value overrides typed by the schema, --out,
their flags; and the config a run with given overrides would get (estimate-vram composes one)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from outlier_hydra.config import config_dir
from outlier_hydra.errors import OutlierHydraError, first_line
from outlier_hydra.registration import register


def compose_config(overrides: list[str]) -> DictConfig:
    """The config a run with these overrides would get (no Hydra runtime); one line on bad overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except HydraException as exc:
        raise OutlierHydraError(first_line(exc)) from None


def settings(overrides: list[str]) -> dict[str, Any]:
    """Hydra-style key=value overrides -> {key: typed value} (lists, numbers, null as on a run's line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise OutlierHydraError(first_line(exc)) from None
    out = {o.key_or_group: o.value() for o in parsed}
    allowed = out.get("allowed_targets", [])
    if not isinstance(allowed, list) or not all(isinstance(p, str) for p in allowed):
        raise OutlierHydraError(f"allowed_targets: a list of module prefixes such as [my_pkg.], got {allowed!r}")
    return out


def no_more(overrides: dict, tool: str) -> None:
    """Refuse settings a tool does not take (after it popped the ones it does)."""
    if overrides:
        raise OutlierHydraError(f"{next(iter(overrides))}: {tool} takes no such setting")


def split_args(args: list[str], flags: Collection[str] = ()) -> tuple[list[Path], list[str], Path | None, frozenset]:
    """(paths, key=value overrides, --out DIR, the flags given among `flags`)."""
    paths, overrides, out, given = [], [], None, set()
    it = iter(args)
    for a in it:
        if a == "--out":
            value = next(it, None)
            if value is None:
                raise OutlierHydraError("--out: give a directory")
            out = Path(value)
        elif a.startswith("--out="):
            out = Path(a.split("=", 1)[1])
        elif a in flags:
            given.add(a)
        elif a.startswith("-"):
            raise OutlierHydraError(f"{a}: unknown option (see outlier-hydra help)")
        elif "=" in a:
            overrides.append(a)
        else:
            paths.append(Path(a))
    return paths, overrides, out, frozenset(given)
