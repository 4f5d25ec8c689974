"""Model side of the pipeline: load (loading.py) and where to hook (adapters.py)."""

from outlier_hydra.models.adapters import HookPoint, ModelAdapter, adapter_for
from outlier_hydra.models.loading import load_model, load_model_config, load_tokenizer

__all__ = ["HookPoint", "ModelAdapter", "adapter_for", "load_model", "load_model_config", "load_tokenizer"]
