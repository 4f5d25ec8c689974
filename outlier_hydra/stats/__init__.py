"""Stats: the small, plain statistics a run keeps per batch, and how they merge exactly."""

from outlier_hydra.stats.outlier_stats import (
    DEFAULT_EDGES,
    FORMAT_VERSION,
    DamagedStats,
    OutlierStats,
    ThresholdNotAnEdge,
    histogram_edges,
    merge_all,
    merge_top_values,
)

__all__ = [
    "DEFAULT_EDGES",
    "FORMAT_VERSION",
    "DamagedStats",
    "OutlierStats",
    "ThresholdNotAnEdge",
    "histogram_edges",
    "merge_all",
    "merge_top_values",
]
