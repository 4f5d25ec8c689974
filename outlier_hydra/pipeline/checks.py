"""Every check of a run's input, in one place: what can fail on bad input fails here, with one line
naming the key, before any weight is read and before anything is written.

  check_settings(cfg)        nothing read yet: the config's ranges (config/validate.py), the settings
                             that name other rooms (data formats, devices, the Triton launch shape in
                             the environment) and the `_target_` nodes (allowed, importable, binding)
  check_against(cfg, facts)  the checkpoint's config.json read once (models.facts.ModelFacts): the
                             layers and the sequence length fit the model; returns the layers
"""

from __future__ import annotations

from omegaconf import DictConfig

from outlier_hydra.collect import fused_triton
from outlier_hydra.config.targets import check_node
from outlier_hydra.config.validate import check_config
from outlier_hydra.data.windows import FORMATS
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models.facts import ModelFacts
from outlier_hydra.models.loading import check_device_map


def check_settings(cfg: DictConfig) -> None:
    check_config(cfg)
    formats = ("auto", *FORMATS)
    if cfg.dataset.format not in formats:
        raise OutlierHydraError(f"dataset.format: {cfg.dataset.format!r} is not one of {', '.join(formats)}")
    try:  # the Triton kernel's launch shape, if $OUTLIER_HYDRA_TRITON_BLOCKS sets one
        fused_triton.launch_shape()
    except ValueError as exc:
        raise OutlierHydraError(str(exc)) from None
    check_device_map(cfg.model.device_map)
    allowed = list(cfg.get("allowed_targets") or [])
    check_node(cfg.analysis.collector, "analysis.collector", allowed)
    check_node(cfg.analysis.analyzer, "analysis.analyzer", allowed)


def check_against(cfg: DictConfig, facts: ModelFacts) -> list[int]:
    """analysis.layers and dataset.sequence_length against the model; the layers (null = all), ascending."""
    n = facts.num_layers
    layers = list(range(n)) if cfg.analysis.layers is None else sorted(int(i) for i in cfg.analysis.layers)
    bad = [i for i in layers if i >= n]
    if bad:
        raise OutlierHydraError(
            f"analysis.layers: layer {bad[0]} is out of range; {cfg.model.name} has {n} layers (0..{n - 1})"
        )
    limit, length = facts.max_positions, cfg.dataset.sequence_length
    if limit is not None and length > limit:
        raise OutlierHydraError(
            f"dataset.sequence_length: {length} is longer than the model allows (max_position_embeddings={limit})"
        )
    return layers
