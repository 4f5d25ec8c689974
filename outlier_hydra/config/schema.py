"""Typed schemas for every config group (dataclasses), stored in Hydra's ConfigStore by
``outlier_hydra.registration.register()``.

``conf/config.yaml`` lists ``config_schema`` first in its defaults, so every YAML option of every group
is merged into these dataclasses: an unknown key or a value of the wrong type fails at start with the
key's full name (``model.dtype``, ``analysis.chunk_layers`` ...). Range checks that a type cannot express
(thresholds > 0, percentages in (0, 1]) live in ``validate.py`` and also run before anything loads.

One default per key: a field is ``MISSING`` here when every option of its group sets it in YAML
(``conf/<group>/*.yaml``), and has its default here otherwise; no YAML repeats a default of this file.
Each stage's settings are typed by its own ``Config`` dataclass (``outlier_hydra/stages/``).
Importing this module has no side effects (submitit pickles these dataclasses into Slurm jobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List

from omegaconf import MISSING


def enum_value(x: Any) -> Any:
    """Enum members of the structured config -> their plain value (str)."""
    return x.value if isinstance(x, Enum) else x


class Dtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class DataSource(str, Enum):
    hub = "hub"
    local = "local"


@dataclass
class ArchitectureConfig:
    """The real checkpoint's shape, written into the model group (config-class defaults are not it).

    Used when the checkpoint's own config.json cannot be read (offline, no cache) by the VRAM
    estimate and to describe the model in results; never to build the model that is analysed.
    """

    model_type: str = MISSING
    num_hidden_layers: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int | None = None
    moe_intermediate_size: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    quantization: str | None = None  # how the checkpoint stores its weights: mxfp4 (gpt-oss experts) | fp8 (DeepSeek-V3)
    extra: Dict[str, Any] = field(default_factory=dict)  # the family's own config keys (n_shared_experts, ...)


@dataclass
class StructureConfig:
    """Module paths that override discovery (* or {i} = layer index), e.g. model.structure.mlp=layers.*.ffn."""

    layers: str | None = None  # the layer stack (a ModuleList), e.g. model.layers
    mixer: str | None = None  # the token mixer whose input is layer_{i}_ln_attn
    mlp: str | None = None  # the MLP / MoE block whose input is layer_{i}_ln_mlp ("none": no MLP)
    router: str | None = None  # the MoE router ("none": dense MLPs)


@dataclass
class ModelConfig:
    name: str = MISSING  # hub id or local directory
    revision: str | None = None
    tokenizer: str | None = None  # null: the model's own
    dtype: Dtype = Dtype.bfloat16
    device_map: str = "auto"  # auto | balanced | cpu | cuda | cuda:N ... (accelerate)
    max_memory: Dict[str, str] | None = None  # per device, e.g. {"0": "70GiB", "cpu": "100GiB"}
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    architecture: ArchitectureConfig | None = None
    structure: StructureConfig = field(default_factory=StructureConfig)


@dataclass
class DatasetConfig:
    source: DataSource = MISSING
    name: str | None = None  # hub dataset id (source=hub)
    config_name: str | None = None  # hub dataset configuration, e.g. "sample-10BT"
    split: str = "train"
    data_files: str | None = None  # path or glob of text / .jsonl / .json / .parquet / .csv files (source=local)
    format: str = "auto"  # auto (by suffix, else by content: UTF-8 text is text) | text | jsonl | json | csv | parquet
    text_field: str = "text"
    streaming: bool = True
    num_sequences: int = MISSING
    sequence_length: int = MISSING
    skip_sequences: int = 0  # windows to skip first
    num_shards: int = 1  # split the num_sequences windows into this many contiguous shards ...
    shard_index: int = 0  # ... and analyse this one (a sweep over shard_index = one job per shard)
    shuffle: bool = False
    shuffle_buffer: int = 10_000
    seed: int = 0


@dataclass
class CollectorConfig:
    """The extraction stage, built with hydra.utils.instantiate."""

    _target_: str = "outlier_hydra.collect.OutlierCollector"
    magnitude_threshold: float = "${analysis.magnitude_threshold}"  # type: ignore[assignment]
    num_examples: int = "${analysis.num_examples}"  # type: ignore[assignment]
    chunk_layers: int | None = "${analysis.chunk_layers}"  # type: ignore[assignment]
    histogram_edges: List[float] | None = "${analysis.histogram_edges}"  # type: ignore[assignment]
    backend: str = "auto"  # auto | dense | compiled | sparse | fused | triton (see collect/reductions.py)
    early_stop: bool = True  # end each forward pass after the last module anything reads


@dataclass
class AnalyzerConfig:
    """The analysis stage, built with hydra.utils.instantiate."""

    _target_: str = "outlier_hydra.analysis.SystematicOutlierAnalysis"
    magnitude_threshold: float = "${analysis.magnitude_threshold}"  # type: ignore[assignment]
    min_layer_percentage: float = "${analysis.min_layer_percentage}"  # type: ignore[assignment]
    min_seq_percentage: float = "${analysis.min_seq_percentage}"  # type: ignore[assignment]
    num_examples: int = "${analysis.num_examples}"  # type: ignore[assignment]


@dataclass
class AnalysisConfig:
    """Values in conf/analysis/default.yaml."""

    magnitude_threshold: float = MISSING
    min_layer_percentage: float = MISSING
    min_seq_percentage: float = MISSING
    layers: List[int] | None = MISSING  # null = every layer
    chunk_layers: int | None = MISSING  # at most N layers' statistics on the device at once (one pass)
    batch_size: int = MISSING  # sequences per forward pass
    num_examples: int = MISSING  # example_values kept per feature
    # |x| edges at which counts are kept exactly (null: stats.DEFAULT_EDGES); the threshold is added
    histogram_edges: List[float] | None = MISSING
    # reuse statistics of an earlier run with the same model, data, layers and edges (pipeline/cache.py)
    reuse_statistics: bool = MISSING
    statistics_cache: str | None = MISSING  # null: the sweep's own cache in a -m run, none otherwise
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    analyzer: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    # name -> the stage's settings (typed by its Config; null = off): conf/analysis/stages/<name>.yaml
    stages: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DeploymentConfig:
    """Where jobs run. The launcher itself is chosen by the deployment option (its YAML overrides
    hydra/launcher); these keys feed hydra.launcher.* there, and any hydra.launcher.* key stays
    overridable on its own."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    # a count, or "auto": the smallest allowed count that fits, decided by the launcher (launch/vram.py)
    gpus_per_node: Any = 0
    min_vram_gb: float | None = None  # memory of one card, for "auto" (null: 80)
    allowed_gpu_counts: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    timeout_min: int = 60
    array_parallelism: int = 256
    max_num_timeout: int = 3  # requeues after a timeout or pre-emption (the run resumes its batches)
    # refuse, before submitting, a request the partition's nodes can never run (sinfo); false: submit anyway
    check_resources: bool = True
    # set by the slurm deployments (their YAML: the launcher's list/dict keys need a value there)
    setup: List[str] | None = None  # shell lines run before the job (module load ...)
    additional_parameters: Dict[str, Any] | None = None  # any other sbatch option


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb
    project: str = "outlier_hydra"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled
    group: str | None = None  # null: the sweep directory in a -m run
    tags: List[str] = field(default_factory=list)
    name: str | None = None
    id: str | None = None  # null: derived from the run directory (a requeued job resumes its run)


@dataclass
class BenchmarkConfig:
    """A benchmark preset (outlier-hydra benchmark benchmark=NAME): a model shape built with random
    weights on the device, and the batch to time."""

    name: str = MISSING
    model_type: str = MISSING
    shape: Dict[str, Any] = field(default_factory=dict)  # transformers config kwargs of that model_type
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda if available, else cpu
    batch_size: int = 4
    sequence_length: int = 512
    repeats: int = 5
    warmup: int = 2
    baseline: bool = True  # also time the copy-to-host tool
    baseline_repeats: int = 1
    memory_tokens: List[int] = field(default_factory=list)  # e.g. [10000, 1000000]: RSS flat, time linear


@dataclass
class Config:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    analysis: AnalysisConfig = MISSING
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    logger: LoggerConfig = MISSING
    # `_target_`s outside outlier_hydra that may be imported (prefixes, e.g. [my_pkg.]); the rest is
    # refused. Commands that read a run directory take it from their own command line only.
    allowed_targets: List[str] = field(default_factory=list)
    debug: bool = False  # full tracebacks instead of one-line errors
    progress: bool = True  # progress bar and summary table
    plots: bool = True  # PNG plots in <run dir>/plots
    # a model on the CPU: freed activations stay with the process for the next forward instead of going
    # back to the OS page by page (glibc; collect/host_memory.py)
    retain_host_memory: bool = True
    extras: Dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the results
    benchmark: BenchmarkConfig | None = None  # only the benchmark command reads it
