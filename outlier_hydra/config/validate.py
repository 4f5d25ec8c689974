"""Range checks of the config that a type cannot express; each failure is one line naming the key.

Types and unknown keys are the schema's job (schema.py, and each stage's Config). The checks that need
other rooms (the model's config.json, the data formats, the devices, the `_target_`s) are
pipeline/checks.py, which runs these first.
"""

from __future__ import annotations

from omegaconf import DictConfig

from outlier_hydra.config.schema import enum_value
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
    gpus = cfg.deployment.gpus_per_node
    _require(
        str(gpus) == "auto" or (isinstance(gpus, int) and gpus >= 0),
        f"deployment.gpus_per_node: a count >= 0 or auto, got {gpus!r}",
    )
    if enum_value(d.source) == "local":
        _require(bool(d.data_files), "dataset.data_files: not set (a path or glob) for dataset.source=local")
    else:
        _require(bool(d.name), "dataset.name: not set (a hub dataset id) for dataset.source=hub")
