"""Model side of the pipeline: load (loading.py) and where to hook, found by structure (structure.py)."""

from outlier_hydra.models.loading import load_model, load_model_config, load_tokenizer
from outlier_hydra.models.structure import HookPoint, Structure, model_structure, probe

__all__ = ["HookPoint", "Structure", "load_model", "load_model_config", "load_tokenizer", "model_structure", "probe"]
