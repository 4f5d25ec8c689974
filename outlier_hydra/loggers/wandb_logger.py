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

FEATURE_COLUMNS = [
    "feature_dim", "max_magnitude", "layer_percentage", "seq_percentage", "total_occurrences",
    "layers_affected", "example_values", "batches_systematic",
]


def run_id(logger_cfg, out: Path) -> str:
    if logger_cfg.id:
        return str(logger_cfg.id)
    return "oh-" + hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:16]


def sweep_group(logger_cfg) -> str | None:
    if logger_cfg.group:
        return logger_cfg.group
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return str(HydraConfig.get().sweep.dir)[-128:]
    except Exception:  # noqa: BLE001 - outside Hydra: no group
        pass
    return None


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

    def log_results(self, results: dict, total, plots: dict, timing: dict) -> None:
        wandb = self.wandb
        t = results["criteria"]["magnitude_threshold"]
        rows = [[r[c] if not isinstance(r[c], list) else ", ".join(map(str, r[c])) for c in FEATURE_COLUMNS]
                for r in results["systematic_outliers"]]
        occ = total.occurrences(t)
        per_module = [[name, int(occ[m].sum()), int((occ[m] > 0).sum()), int(total.nonfinite[m]),
                       float(total.max_abs[m].max())] for m, name in enumerate(total.module_names)]
        payload = {
            "systematic_outliers": wandb.Table(columns=FEATURE_COLUMNS, data=rows),
            "per_module_outliers": wandb.Table(
                columns=["module", "outliers", "dims_with_outliers", "nonfinite", "max_abs"], data=per_module),
            "histograms/abs_x": _histogram(wandb, total.ge_counts.sum((0, 1)), total.edges, float(total.max_abs.max())),
            "histograms/position_max_abs_x": _histogram(wandb, total.pos_ge_counts.sum(0), total.edges, float(total.max_abs.max())),
        }
        for name, path in plots.items():
            payload[f"plots/{name}"] = wandb.Image(str(path))
        payload.update(_stage_tables(wandb, results))
        self.run.log(payload)
        self.run.summary.update({
            "num_systematic_outliers": results["num_systematic_outliers"],
            "max_magnitude": max((r["max_magnitude"] for r in results["systematic_outliers"]), default=0.0),
            "num_tokens": results["num_tokens"],
            "num_hooked_modules": results["num_hooked_modules"],
            "tokens_per_second": timing.get("tokens_per_second"),
            "systematic_dims": [r["feature_dim"] for r in results["systematic_outliers"]],
        })

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _stage_tables(wandb, results: dict) -> dict:
    out = {}
    moe = results.get("moe_routing")
    if moe:
        rows = [[f["feature_dim"], entry["layer"], entry["outlier_positions"], t["expert"], t["position_share"], t["share"]]
                for f in moe["features"] for entry in f["layers"] for t in entry["top_experts"][:1]]
        out["moe_routing/feature_top_expert"] = wandb.Table(
            columns=["feature_dim", "layer", "outlier_positions", "top_expert", "position_share", "choice_share"], data=rows)
        out["moe_routing/layers"] = wandb.Table(
            columns=["layer", "entropy_mean", "top1_share_mean", "tokens_per_expert"],
            data=[[entry["layer"], entry["entropy_mean"], entry["top1_share_mean"], str(entry["tokens_per_expert"])]
                  for entry in moe["layers"]])
    massive = results.get("massive_activations")
    if massive:
        rows = [[entry["layer"], m["value"], m["dim"], m["sequence"], m["position"], m.get("token", "")]
                for entry in massive["layers"] for m in entry["massive"]]
        out["massive_activations"] = wandb.Table(columns=["layer", "value", "dim", "sequence", "position", "token"], data=rows)
    int8 = results.get("int8_error")
    if int8:
        out["int8/relative_error_all_int8"] = int8["relative_error_all_int8"]
        out["int8/relative_error_outliers_kept"] = int8["relative_error_outliers_kept"]
    return out


def _histogram(wandb, ge: np.ndarray, edges: np.ndarray, top: float):
    """Counts >= each edge -> a histogram over [edges[0], max |x|] (values below edges[0] are not kept)."""
    counts = np.append(ge[:-1] - ge[1:], ge[-1])
    bins = np.append(edges, max(top, edges[-1]) * 1.0001)
    return wandb.Histogram(np_histogram=(counts.tolist(), bins.tolist()))
