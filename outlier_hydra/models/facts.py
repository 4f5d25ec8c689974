"""What a run is checked against, read once from the checkpoint's config (no weight is read).

prepare() (pipeline/plan.py) asks for one ModelFacts and checks layers, sequence length and the
tokenizer's ids against it in one place; the structure discovery found comes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from outlier_hydra.models.configs import config_top_k, text_config
from outlier_hydra.models.discovery import discover, model_structure
from outlier_hydra.models.loading import load_model_config
from outlier_hydra.models.types import Structure


@dataclass(frozen=True)
class ModelFacts:
    name: str  # model.name as configured (hub id or directory)
    config: Any  # transformers' config of the checkpoint
    model_type: str
    num_layers: int
    hidden_size: int
    max_positions: int | None  # max_position_embeddings (None: the family sets no limit)
    vocab_size: int | None  # rows of the input embeddings
    top_k: int | None  # experts per token (None: not an MoE config)
    structure: Structure  # where to hook, from discovery on the meta device

    @property
    def text(self) -> Any:
        return text_config(self.config)


def read_facts(model_cfg) -> ModelFacts:
    """The checkpoint's config.json and the structure discovery finds in it (on the meta device),
    with one-line errors."""
    config = load_model_config(model_cfg)
    return _facts(str(model_cfg.name), config, model_structure(model_cfg, config))


def facts_of(model, name: str) -> ModelFacts:
    """The same for a model already built (the benchmark's random weights): its own config, discovery
    on the model itself."""
    text = text_config(model.config)
    return _facts(name, model.config, discover(model, int(text.num_hidden_layers), int(text.hidden_size), None, name))


def _facts(name: str, config: Any, structure: Structure) -> ModelFacts:
    text = text_config(config)
    vocab = getattr(text, "vocab_size", None)
    return ModelFacts(
        name=name,
        config=config,
        model_type=str(config.model_type),
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        max_positions=getattr(text, "max_position_embeddings", None),
        vocab_size=int(vocab) if isinstance(vocab, int) else None,
        top_k=config_top_k(text),
        structure=structure,
    )
