"""PNG plots of a run (in <run dir>/plots, also logged to W&B), made without a display.

  outlier_heatmap.png    outlier occurrences, hooked module x feature dim, for the top dims
  criteria.png           per systematic feature: layer and seq percentage against the criteria
  max_abs_by_depth.png   max |x| per hooked module for the top dims: where outliers emerge
and whatever each stage draws from its own section of the results (Stage.plots).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from outlier_hydra.figures import pyplot, save_figure
from outlier_hydra.models.label import short_name
from outlier_hydra.stages import Stage
from outlier_hydra.stats import OutlierStats

TOP_DIMS = 16


def top_dims(results: dict, total: OutlierStats, threshold: float, n: int = TOP_DIMS) -> list[int]:
    """Systematic dims first (by max magnitude), then the dims with most outliers."""
    dims = [r["feature_dim"] for r in results["systematic_outliers"]][:n]
    by_count = np.argsort(-total.occurrences(threshold).sum(0), kind="stable")
    for d in by_count:
        if len(dims) >= n:
            break
        if int(d) not in dims and total.occurrences(threshold)[:, d].sum() > 0:
            dims.append(int(d))
    return dims


def make_plots(folder: Path, results: dict, total: OutlierStats, stages: Sequence[Stage] = ()) -> dict[str, Path]:
    """The run's plots, then each stage's from its section of the results: name -> PNG path."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    paths = core_plots(folder, results, total)
    for stage in stages:
        if stage.name in results:
            paths.update(stage.plots(results[stage.name], folder))
    return paths


def core_plots(folder: Path, results: dict, total: OutlierStats) -> dict[str, Path]:
    plt = pyplot()
    threshold = results["criteria"]["magnitude_threshold"]
    model = short_name(results["model"]["name"])
    title = f"{model} ({results['model']['model_type']}), {results['num_tokens']} tokens, |x| >= {threshold:g}"
    paths = {}
    dims = top_dims(results, total, threshold)
    modules = total.module_names
    systematic = {r["feature_dim"] for r in results["systematic_outliers"]}

    # 1. heatmap
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(dims) + 3), max(4, 0.28 * len(modules) + 2)))
    if dims:
        occ = total.occurrences(threshold)[:, dims].astype(float)
        im = ax.imshow(np.log10(1 + occ), aspect="auto", cmap="magma_r", interpolation="nearest")
        ax.set_xticks(range(len(dims)), [f"{d}{'*' if d in systematic else ''}" for d in dims], rotation=90)
        fig.colorbar(im, ax=ax, label="log10(1 + outlier count)")
    else:
        ax.text(0.5, 0.5, "no outliers at this threshold", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ax.set_xlabel("feature dim (* = systematic)")
    ax.set_title(f"Outlier occurrences\n{title}", fontsize=9)
    paths["outlier_heatmap"] = save_figure(fig, folder / "outlier_heatmap.png")

    # 2. criteria
    recs = results["systematic_outliers"][:TOP_DIMS]
    c = results["criteria"]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 0.5 * len(recs) + 4), 3.6), sharex=True)
    labels = [str(r["feature_dim"]) for r in recs]
    for ax, key, minimum, name in (
        (axes[0], "layer_percentage", c["min_layer_percentage"], "share of hooked modules"),
        (axes[1], "seq_percentage", c["min_seq_percentage"], "share of token positions"),
    ):
        ax.bar(range(len(recs)), [100 * r[key] for r in recs], color="tab:blue")
        ax.axhline(100 * minimum, color="tab:red", linestyle="--", label=f"criterion {100 * minimum:g}%")
        ax.set_xticks(range(len(recs)), labels, rotation=90)
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{name} (%)")
        ax.set_xlabel("systematic feature dim")
        ax.legend(fontsize=8, loc="upper right")
    if not recs:
        axes[0].text(0.5, 0.5, "no systematic features", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(f"Systematic features against the criteria\n{title}", fontsize=9)
    paths["criteria"] = save_figure(fig, folder / "criteria.png")

    # 3. max |x| by depth
    fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(modules) + 3), 4))
    for d in dims[:8]:
        ax.plot(range(len(modules)), total.max_abs[:, d], marker="o", markersize=3, label=f"dim {d}")
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xticks(range(len(modules)), modules, rotation=90, fontsize=7)
    ax.set_ylabel("max |x|")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Max |x| per hooked module for the top dims\n{title}", fontsize=9)
    paths["max_abs_by_depth"] = save_figure(fig, folder / "max_abs_by_depth.png")
    return paths
