"""Stages: optional analyses that ride on the outlier collection, one module (or package) each.

The protocol a stage implements is protocol.py; which stages exist and run is registry.py. The
built-in stages: moe_routing, experts (a package), massive_activations, int8_error, massive_routing.
"""

from outlier_hydra.stages.protocol import (
    COLLECT,
    POST,
    ArrayStats,
    Hook,
    PostContext,
    Reach,
    ReportContext,
    Stage,
    StageConfig,
    plain,
)
from outlier_hydra.stages.registry import StageSet, build_stages, builtin_stages, stage_class, typed_settings

__all__ = [
    "COLLECT",
    "POST",
    "ArrayStats",
    "Hook",
    "PostContext",
    "Reach",
    "ReportContext",
    "Stage",
    "StageConfig",
    "StageSet",
    "build_stages",
    "builtin_stages",
    "plain",
    "stage_class",
    "typed_settings",
]
