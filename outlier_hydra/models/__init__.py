"""Model side of the pipeline: load a checkpoint (loading.py), read its config once (facts.py), find
where to hook by structure (discovery.py, on the meta device) and check it with one probe forward
(probe.py); the data they produce is types.py. size.py counts what a checkpoint weighs."""

from outlier_hydra.models.discovery import discover, model_structure
from outlier_hydra.models.facts import ModelFacts, read_facts
from outlier_hydra.models.loading import load_model, load_model_config, load_tokenizer
from outlier_hydra.models.probe import probe
from outlier_hydra.models.types import HookPoint, LayerParts, MoeLayer, Structure

__all__ = [
    "HookPoint",
    "LayerParts",
    "ModelFacts",
    "MoeLayer",
    "Structure",
    "discover",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "model_structure",
    "probe",
    "read_facts",
]
