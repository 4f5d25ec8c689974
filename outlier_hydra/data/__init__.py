"""Data: a text stream (local files or a hub dataset) cut into token windows; the shipped corpus."""

from outlier_hydra.data.windows import sequence_range, token_windows

__all__ = ["sequence_range", "token_windows"]
