"""Pipeline: run(cfg), the run directory it writes, and statistics reuse across a sweep."""

from outlier_hydra.pipeline.job import run

__all__ = ["run"]
