"""How much GPU memory a run needs, and how many GPUs of common sizes that means.

    python -m outlier_hydra.estimate_vram model=qwen3_30b [dataset.sequence_length=4096 ...]

The model's shape comes from its config.json when it can be read (a local directory, or the hub when
online), else from the config group's `model.architecture` numbers. Parameters are counted on a
model built on the meta device (no memory, no download): total and, for MoE, active per token
(non-expert weights + top_k / num_experts of the expert weights). Memory per GPU:
  weights      the base model's parameters (the LM head is never loaded) x dtype bytes / GPUs
  activations  the peak of one layer's forward for batch_size x sequence_length tokens
               (residual stream, q/k/v, the MLP or the routed experts' intermediates), x 1.5
  statistics   the per-position buffers and per-module counts the collector keeps on the device
  overhead     CUDA context and allocator slack, 1.5 GB
A setup fits when that stays under 92% of the card. `deployment.gpus_per_node: auto` asks this
module for the smallest allowed count of `deployment.min_vram_gb` (default 80) GB cards.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from outlier_hydra.errors import OutlierHydraError

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

    def per_gpu_gb(self, gpus: int) -> float:
        return self.weights_gb / gpus + self.activations_gb + self.statistics_gb + self.overhead_gb

    def gpus_needed(self, card_gb: float, allowed=(1, 2, 4, 8)) -> int | None:
        for n in sorted(allowed):
            if self.per_gpu_gb(n) <= USABLE * card_gb:
                return n
        return None


def _value(x):
    return getattr(x, "value", x)


def hf_config(model_cfg):
    """(transformers config, source): config.json if readable, else the group's architecture."""
    from transformers import AutoConfig

    from outlier_hydra.models.loading import load_model_config

    try:
        return load_model_config(model_cfg), "config.json"
    except OutlierHydraError:
        if model_cfg.get("architecture") is None:
            raise
    arch = {k: v for k, v in dict(model_cfg.architecture).items() if v is not None}
    model_type = arch.pop("model_type")
    if model_type == "mixtral" and "num_experts" in arch:
        arch["num_local_experts"] = arch.pop("num_experts")
    return AutoConfig.for_model(model_type, **arch), "model.architecture"


def count_params(config) -> tuple[int, int, int]:
    """(total, active per token, loaded base model) from a model built on the meta device."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    active = total - experts + (experts * k // num_experts if experts and num_experts and k else experts)
    base = getattr(model, "base_model", model)
    loaded = sum(p.numel() for p in base.parameters())
    return total, active, loaded


def estimate(cfg) -> VramEstimate:
    config, source = hf_config(cfg.model)
    total, active, loaded = count_params(config)
    nbytes = BYTES[_value(cfg.model.dtype)]
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
        weights_gb=loaded * nbytes / GB,
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


def table(est: VramEstimate) -> str:
    lines = [
        f"{est.model}  (shape from {est.source})",
        f"  parameters: {est.total_params / 1e9:.2f}B total, {est.active_params / 1e9:.2f}B active per token, "
        f"{est.loaded_params / 1e9:.2f}B loaded (base model)",
        f"  per GPU: weights {est.weights_gb:.1f} GB / n + activations {est.activations_gb:.1f} GB + statistics "
        f"{est.statistics_gb:.2f} GB + overhead {est.overhead_gb:.1f} GB",
        "  card    GPUs   GB per GPU",
    ]
    for card in CARDS_GB:
        n = est.gpus_needed(card)
        lines.append(f"  {card:>3} GB  {n if n else '-':>4}   {est.per_gpu_gb(n):.1f}" if n else f"  {card:>3} GB     -   does not fit on 8")
    best = next(((c, est.gpus_needed(c)) for c in CARDS_GB if est.gpus_needed(c) == 1), None)
    if best:
        lines.append(f"  smallest single card that fits: {best[0]} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir

    from outlier_hydra import schema  # noqa: F401
    from outlier_hydra.paths import config_dir

    overrides = sys.argv[1:] if argv is None else argv
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    from outlier_hydra.cli import exit_code_of

    return exit_code_of("outlier_hydra.estimate_vram", lambda: print(table(estimate(cfg))))


if __name__ == "__main__":
    sys.exit(main())
