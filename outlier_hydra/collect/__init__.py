"""Collect: forward hooks that reduce activations to statistics on the model's device."""

from outlier_hydra.collect.collector import OutlierCollector, histogram_edges_for, layer_chunks
from outlier_hydra.collect.hooks import attached

__all__ = ["OutlierCollector", "attached", "histogram_edges_for", "layer_chunks"]
