"""Checks that run before anything heavy loads; each failure is one line naming the key.

Types and unknown keys are the schema's job (schema.py, and each stage's Config); this module checks
ranges, the `_target_` nodes (allowed, importable, and their arguments bind to the signature), and,
once the model's config.json is read (no weights), that layers and sequence length fit the model.
"""

from __future__ import annotations

from omegaconf import DictConfig

from outlier_hydra.collect import fused_triton
from outlier_hydra.config import enum_value
from outlier_hydra.config.targets import check_node
from outlier_hydra.errors import OutlierHydraError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise OutlierHydraError(message)


def check_config(cfg: DictConfig) -> None:
    a, d = cfg.analysis, cfg.dataset
    _require(a.magnitude_threshold > 0, f"analysis.magnitude_threshold: must be > 0, got {a.magnitude_threshold}")
    for key in ("min_layer_percentage", "min_seq_percentage"):
        v = a[key]
        _require(0 < v <= 1, f"analysis.{key}: must be in (0, 1] (a fraction, 0.25 = 25%), got {v}")
    _require(a.batch_size >= 1, f"analysis.batch_size: must be >= 1, got {a.batch_size}")
    _require(a.num_examples >= 1, f"analysis.num_examples: must be >= 1, got {a.num_examples}")
    _require(
        a.chunk_layers is None or a.chunk_layers >= 1, f"analysis.chunk_layers: must be null or >= 1, got {a.chunk_layers}"
    )
    if a.layers is not None:
        layers = list(a.layers)
        _require(len(layers) > 0, "analysis.layers: empty list (use null for every layer)")
        _require(all(i >= 0 for i in layers), f"analysis.layers: negative index in {layers}")
        _require(len(set(layers)) == len(layers), f"analysis.layers: duplicate index in {layers}")
    _require(d.num_sequences >= 1, f"dataset.num_sequences: must be >= 1, got {d.num_sequences}")
    _require(d.sequence_length >= 1, f"dataset.sequence_length: must be >= 1, got {d.sequence_length}")
    _require(d.skip_sequences >= 0, f"dataset.skip_sequences: must be >= 0, got {d.skip_sequences}")
    _require(d.shuffle_buffer >= 1, f"dataset.shuffle_buffer: must be >= 1, got {d.shuffle_buffer}")
    _require(
        1 <= d.num_shards <= d.num_sequences,
        f"dataset.num_shards: must be between 1 and dataset.num_sequences ({d.num_sequences}), got {d.num_shards}",
    )
    _require(
        0 <= d.shard_index < d.num_shards,
        f"dataset.shard_index: must be in [0, {d.num_shards}) for dataset.num_shards={d.num_shards}, got {d.shard_index}",
    )
    try:  # the Triton kernel's launch shape, if $OUTLIER_HYDRA_TRITON_BLOCKS sets one
        fused_triton.launch_shape()
    except ValueError as exc:
        raise OutlierHydraError(str(exc)) from None
    gpus = cfg.deployment.gpus_per_node
    _require(
        str(gpus) == "auto" or (isinstance(gpus, int) and gpus >= 0),
        f"deployment.gpus_per_node: a count >= 0 or auto, got {gpus!r}",
    )
    from outlier_hydra.data.windows import FORMATS

    formats = ("auto", *FORMATS)
    _require(d.format in formats, f"dataset.format: {d.format!r} is not one of {', '.join(formats)}")
    if enum_value(d.source) == "local":
        _require(bool(d.data_files), "dataset.data_files: not set (a path or glob) for dataset.source=local")
    else:
        _require(bool(d.name), "dataset.name: not set (a hub dataset id) for dataset.source=hub")
    from outlier_hydra.models.loading import check_device_map

    check_device_map(cfg.model.device_map)
    allowed = list(cfg.get("allowed_targets") or [])
    check_node(a.collector, "analysis.collector", allowed)
    check_node(a.analyzer, "analysis.analyzer", allowed)


def resolve_layers(cfg: DictConfig, model_config) -> list[int]:
    """analysis.layers checked against the model (null = all), in ascending order."""
    n = model_config.num_hidden_layers
    if cfg.analysis.layers is None:
        return list(range(n))
    layers = sorted(int(i) for i in cfg.analysis.layers)
    bad = [i for i in layers if i >= n]
    if bad:
        raise OutlierHydraError(
            f"analysis.layers: layer {bad[0]} is out of range; {cfg.model.name} has {n} layers (0..{n - 1})"
        )
    return layers


def check_sequence_length(cfg: DictConfig, model_config) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    length = cfg.dataset.sequence_length
    _require(
        limit is None or length <= limit,
        f"dataset.sequence_length: {length} is longer than the model allows (max_position_embeddings={limit})",
    )
