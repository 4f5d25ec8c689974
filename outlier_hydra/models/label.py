"""The short name a reader knows a model by, in tables, titles and legends."""

from __future__ import annotations


def short_name(name: str) -> str:
    """A hub id as it is (org/name); a local path by its last two parts."""
    return "/".join(str(name).rstrip("/").split("/")[-2:])
