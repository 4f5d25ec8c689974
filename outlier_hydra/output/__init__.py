"""Output: what people look at besides the JSON files: the summary table, plots, loggers (W&B)."""

from outlier_hydra.output.loggers import open_logger
from outlier_hydra.output.plots import make_plots
from outlier_hydra.output.summary import print_summary

__all__ = ["make_plots", "open_logger", "print_summary"]
