"""How much GPU memory a run needs, and how many GPUs of common sizes that means.

    outlier-hydra estimate-vram model=qwen3_30b [dataset.sequence_length=4096 ...]

The model's shape comes from its config.json when it can be read (a local directory, or the hub when
online), else from the config group's `model.architecture` numbers. Parameters are counted on a
model built on the meta device (no memory, no download): total and, for MoE, active per token
(non-expert weights + top_k / num_experts of the expert weights). Memory per GPU:
  weights      the base model's parameters (the LM head is never loaded) x their *stored* bytes / GPUs:
               model.dtype, except what a quantized checkpoint keeps quantized (its
               quantization_config): MXFP4 expert weights (gpt-oss) 4.25 bits, FP8 linear weights
               (DeepSeek-V3) 1 byte + a float32 scale per 128 x 128 block
  activations  the peak of one layer's forward for batch_size x sequence_length tokens
               (residual stream, q/k/v, the MLP or the routed experts' intermediates), x 1.5
  statistics   the per-position buffers and per-module counts the collector keeps on the device
  overhead     CUDA context and allocator slack, 1.5 GB
A setup fits when that stays under 92% of the card. `deployment.gpus_per_node: auto` makes the
launcher ask this module for the smallest allowed count of `deployment.min_vram_gb` (default 80) GB
cards, when it submits (never while the config is composed).
"""

from __future__ import annotations

from dataclasses import dataclass

from outlier_hydra.config.schema import enum_value
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models.size import count_params, hf_config, quant_method

CARDS_GB = (24, 40, 48, 80, 141)
USABLE = 0.92
OVERHEAD_GB = 1.5
ACTIVATION_SAFETY = 1.5
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GB = 1024**3


@dataclass
class VramEstimate:
    model: str
    source: str  # where the shape came from
    total_params: int
    active_params: int
    loaded_params: int
    weights_gb: float
    activations_gb: float
    statistics_gb: float
    overhead_gb: float
    quantization: str | None = None  # the checkpoint's quant_method, when it stores weights quantized
    dequantized_weights_gb: float | None = None  # the same weights in model.dtype

    def per_gpu_gb(self, gpus: int) -> float:
        return self.weights_gb / gpus + self.activations_gb + self.statistics_gb + self.overhead_gb

    def gpus_needed(self, card_gb: float, allowed=(1, 2, 4, 8)) -> int | None:
        for n in sorted(allowed):
            if self.per_gpu_gb(n) <= USABLE * card_gb:
                return n
        return None


def estimate(cfg) -> VramEstimate:
    config, source = hf_config(cfg.model)
    nbytes = BYTES[enum_value(cfg.model.dtype)]
    total, active, loaded, stored, plain = count_params(config, nbytes)
    tokens = cfg.analysis.batch_size * cfg.dataset.sequence_length
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    k = getattr(config, "num_experts_per_tok", None)
    moe_inter = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 4 * hidden)
    mlp = (k or 1) * (moe_inter if k else getattr(config, "intermediate_size", 4 * hidden))
    per_token = 6 * hidden + 2 * (heads + 2 * kv_heads) * head_dim + 3 * mlp
    activations = ACTIVATION_SAFETY * tokens * per_token * nbytes
    layers = len(cfg.analysis.layers) if cfg.analysis.layers else config.num_hidden_layers
    edges = 16
    statistics = 3 * tokens * hidden * 4 + 2 * layers * hidden * edges * 8
    return VramEstimate(
        model=cfg.model.name,
        source=source,
        total_params=total,
        active_params=active,
        loaded_params=loaded,
        weights_gb=stored / GB,
        quantization=quant_method(config) if stored < plain else None,
        dequantized_weights_gb=plain / GB if stored < plain else None,
        activations_gb=activations / GB,
        statistics_gb=statistics / GB,
        overhead_gb=OVERHEAD_GB,
    )


def gpus_per_node(cfg) -> int:
    """deployment.gpus_per_node as a number: itself, or for `auto` the smallest count that fits."""
    d = cfg.deployment
    if str(d.gpus_per_node) != "auto":
        return int(d.gpus_per_node)
    card = d.min_vram_gb or 80
    est = estimate(cfg)
    n = est.gpus_needed(card, tuple(d.allowed_gpu_counts))
    if n is None:
        raise OutlierHydraError(
            f"deployment.gpus_per_node=auto: {cfg.model.name} needs {est.per_gpu_gb(max(d.allowed_gpu_counts)):.1f} GB "
            f"per GPU even on {max(d.allowed_gpu_counts)} GPUs; no allowed count ({', '.join(map(str, d.allowed_gpu_counts))}) "
            f"of {card:g} GB cards fits (raise deployment.min_vram_gb or deployment.allowed_gpu_counts)"
        )
    return n
