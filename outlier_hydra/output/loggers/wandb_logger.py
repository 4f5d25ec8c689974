"""Weights & Biases: the resolved config, the feature table, per-module counts, histograms, plots.

The run id is derived from the run directory (or set with logger.id), so a job that Slurm requeues
into the same directory continues the same W&B run (resume="allow"). In a sweep the group defaults
to the sweep directory, so its jobs sit together. `logger.mode=offline` needs no network; upload
later with `wandb sync <run dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from outlier_hydra.analysis.criteria import FEATURE_FIELDS as FEATURE_COLUMNS
from outlier_hydra.config.runtime import multirun_sweep_dir


def run_id(logger_cfg, out: Path) -> str:
    if logger_cfg.id:
        return str(logger_cfg.id)
    return "oh-" + hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:16]


def sweep_group(logger_cfg) -> str | None:
    if logger_cfg.group:
        return logger_cfg.group
    sweep = multirun_sweep_dir()
    return str(sweep)[-128:] if sweep is not None else None


class WandbLogger:
    def __init__(self, logger_cfg, out: Path, plain_config: dict):
        import wandb

        self.wandb = wandb
        os.makedirs(out, exist_ok=True)
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            group=sweep_group(logger_cfg),
            tags=list(logger_cfg.tags),
            name=logger_cfg.name,
            config=plain_config,
            dir=str(out),
            id=run_id(logger_cfg, out),
            resume="allow",
        )

    def log_results(self, results: dict, total, plots: dict, timing: dict, stages=(), report=None) -> None:
        wandb = self.wandb
        t = results["criteria"]["magnitude_threshold"]
        rows = [
            [r[c] if not isinstance(r[c], list) else ", ".join(map(str, r[c])) for c in FEATURE_COLUMNS]
            for r in results["systematic_outliers"]
        ]
        occ = total.occurrences(t)
        per_module = [
            [name, int(occ[m].sum()), int((occ[m] > 0).sum()), int(total.nonfinite[m]), float(total.max_abs[m].max())]
            for m, name in enumerate(total.module_names)
        ]
        payload = {
            "systematic_outliers": wandb.Table(columns=FEATURE_COLUMNS, data=rows),
            "per_module_outliers": wandb.Table(
                columns=["module", "outliers", "dims_with_outliers", "nonfinite", "max_abs"], data=per_module
            ),
            "histograms/abs_x": _histogram(wandb, total.ge_counts.sum((0, 1)), total.edges, float(total.max_abs.max())),
            "histograms/position_max_abs_x": _histogram(
                wandb, total.pos_ge_counts.sum(0), total.edges, float(total.max_abs.max())
            ),
        }
        for name, path in plots.items():
            payload[f"plots/{name}"] = wandb.Image(str(path))
        for stage in stages:
            if stage.name in results:
                payload.update(stage.tables(results[stage.name], wandb))
        self.run.log(payload)
        if report is not None:  # the self-contained report.html, as an artifact of the run
            artifact = wandb.Artifact(f"report-{self.run.id}", type="report")
            artifact.add_file(str(report), name="report.html")
            self.run.log_artifact(artifact)
        self.run.summary.update(
            {
                "num_systematic_outliers": results["num_systematic_outliers"],
                "max_magnitude": max((r["max_magnitude"] for r in results["systematic_outliers"]), default=0.0),
                "num_tokens": results["num_tokens"],
                "num_hooked_modules": results["num_hooked_modules"],
                "tokens_per_second": timing.get("tokens_per_second"),
                "systematic_dims": [r["feature_dim"] for r in results["systematic_outliers"]],
            }
        )

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _histogram(wandb, ge: np.ndarray, edges: np.ndarray, top: float):
    """Counts >= each edge -> a histogram over [edges[0], max |x|] (values below edges[0] are not kept)."""
    counts = np.append(ge[:-1] - ge[1:], ge[-1])
    bins = np.append(edges, max(top, edges[-1]) * 1.0001)
    return wandb.Histogram(np_histogram=(counts.tolist(), bins.tolist()))
