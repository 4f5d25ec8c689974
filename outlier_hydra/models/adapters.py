"""Adapters: what each model family calls the tensors entering attention and the MLP/MoE block.

A hook point is a module whose *output* is the tensor we analyse:
- pre-norm decoders (OLMoE, Qwen3-MoE, Mixtral, Llama, Qwen, Mistral): the outputs of
  ``layers.{i}.input_layernorm`` (enters attention) and ``layers.{i}.post_attention_layernorm``
  (enters the MLP/MoE block);
- post-norm encoders (BERT, MiniLM): attention of layer i reads the hidden state entering layer i,
  which is the output of the embeddings' LayerNorm for i = 0 and of layer i-1's output LayerNorm
  after that; the MLP reads the attention-output LayerNorm.
Hook points are chosen by module name, never by class (q_norm / k_norm are RMSNorms too).
Adding a family is one entry in ADAPTERS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from outlier_hydra.errors import OutlierHydraError


@dataclass(frozen=True)
class HookPoint:
    name: str  # layer_{i}_ln_attn / layer_{i}_ln_mlp
    layer: int
    module_path: str  # dotted path inside the base model


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    attn_input: Callable[[int], str]
    mlp_input: Callable[[int], str]
    router: Callable[[int], str] | None = None  # MoE router module (returns logits, weights, indices)
    layer: Callable[[int], str] | None = None  # the whole layer i (its output: the residual stream)

    def hook_points(self, layers: list[int]) -> list[HookPoint]:
        """Hook points in model (execution) order for the given layers."""
        points = []
        for i in sorted(layers):
            points.append(HookPoint(f"layer_{i}_ln_attn", i, self.attn_input(i)))
            points.append(HookPoint(f"layer_{i}_ln_mlp", i, self.mlp_input(i)))
        return points


PRE_NORM_DECODER = ModelAdapter(
    family="pre_norm_decoder",
    attn_input=lambda i: f"layers.{i}.input_layernorm",
    mlp_input=lambda i: f"layers.{i}.post_attention_layernorm",
    layer=lambda i: f"layers.{i}",
)
PRE_NORM_MOE = ModelAdapter(
    family="pre_norm_moe",
    attn_input=PRE_NORM_DECODER.attn_input,
    mlp_input=PRE_NORM_DECODER.mlp_input,
    router=lambda i: f"layers.{i}.mlp.gate",
    layer=PRE_NORM_DECODER.layer,
)
GPT_OSS = ModelAdapter(  # pre-norm MoE whose router is mlp.router (logits, top-k scores, top-k indices)
    family="gpt_oss",
    attn_input=PRE_NORM_DECODER.attn_input,
    mlp_input=PRE_NORM_DECODER.mlp_input,
    router=lambda i: f"layers.{i}.mlp.router",
    layer=PRE_NORM_DECODER.layer,
)
POST_NORM_ENCODER = ModelAdapter(
    family="post_norm_encoder",
    attn_input=lambda i: "embeddings.LayerNorm" if i == 0 else f"encoder.layer.{i - 1}.output.LayerNorm",
    mlp_input=lambda i: f"encoder.layer.{i}.attention.output.LayerNorm",
    layer=lambda i: f"encoder.layer.{i}",
)

# config.json `model_type` -> adapter
ADAPTERS: dict[str, ModelAdapter] = {
    "olmoe": PRE_NORM_MOE,
    "qwen3_moe": PRE_NORM_MOE,
    "qwen2_moe": PRE_NORM_MOE,
    "mixtral": PRE_NORM_MOE,
    "gpt_oss": GPT_OSS,
    "llama": PRE_NORM_DECODER,
    "mistral": PRE_NORM_DECODER,
    "qwen2": PRE_NORM_DECODER,
    "qwen3": PRE_NORM_DECODER,
    "bert": POST_NORM_ENCODER,
}


def adapter_for(model_type: str) -> ModelAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise OutlierHydraError(
            f"model.name: model_type {model_type!r} has no adapter; supported: {', '.join(sorted(ADAPTERS))} "
            "(add one in outlier_hydra/models/adapters.py)"
        ) from None
