"""Reading a transformers config the way every family can be read: its language model, its top-k."""

from __future__ import annotations

TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_top_k", "topk")


def text_config(config):
    """The language model's config (composite configs keep it in text_config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def config_top_k(config) -> int | None:
    """Experts chosen per token, under whichever name the family gives it (None: not an MoE config)."""
    for key in TOP_K_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
            return int(v[0])
    return None
