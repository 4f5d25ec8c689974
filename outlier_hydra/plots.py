"""PNG plots of a run (in <run dir>/plots, also logged to W&B), made without a display.

  outlier_heatmap.png    outlier occurrences, hooked module x feature dim, for the top dims
  criteria.png           per systematic feature: layer and seq percentage against the criteria
  max_abs_by_depth.png   max |x| per hooked module for the top dims: where outliers emerge
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from outlier_hydra.stats import OutlierStats

TOP_DIMS = 16


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def make_plots(out: Path, results: dict, total: OutlierStats, threshold: float) -> dict[str, Path]:
    plt = _plt()
    folder = Path(out) / "plots"
    folder.mkdir(exist_ok=True)
    model = "/".join(results["model"]["name"].rstrip("/").split("/")[-2:])  # org/name, or a path's last two parts
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
    paths["outlier_heatmap"] = _save(fig, folder / "outlier_heatmap.png", plt)

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
    paths["criteria"] = _save(fig, folder / "criteria.png", plt)

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
    paths["max_abs_by_depth"] = _save(fig, folder / "max_abs_by_depth.png", plt)
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_stage_plots(out: Path, results: dict) -> dict[str, Path]:
    """moe_expert_load.png (router stage) and massive_activations.png (massive stage), when present."""
    plt = _plt()
    folder = Path(out) / "plots"
    folder.mkdir(exist_ok=True)
    paths = {}
    moe = results.get("moe_routing")
    if moe and moe["features"]:
        feats = [f for f in moe["features"] if f["layers"]][:3]
        fig, axes = plt.subplots(1, max(1, len(feats)), figsize=(5 * max(1, len(feats)), 3.8), squeeze=False)
        overall = {layer["layer"]: np.asarray(layer["tokens_per_expert"], float) for layer in moe["layers"]}
        for ax, f in zip(axes[0], feats):
            layers = [entry["layer"] for entry in f["layers"]]
            top_e = [entry["top_experts"][0]["expert"] for entry in f["layers"]]
            at_outliers = [entry["top_experts"][0]["position_share"] for entry in f["layers"]]
            tokens = {layer["layer"]: layer["tokens"] for layer in moe["layers"]}
            base = [overall[layer][e] / tokens[layer] for layer, e in zip(layers, top_e)]
            ax.plot(layers, at_outliers, marker="o", label="at the feature's outlier positions")
            ax.plot(layers, base, marker="s", linestyle="--", label="over all tokens")
            for layer, e, y in zip(layers, top_e, at_outliers):
                ax.annotate(f"e{e}", (layer, y), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
            ax.set_ylim(0, 1.05)
            ax.set_xticks(layers)
            ax.set_xlabel("MoE layer")
            ax.set_ylabel("share of positions routed to the top expert")
            ax.set_title(f"feature dim {f['feature_dim']}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle("Expert load at outlier positions vs overall (annotated: the top expert)", fontsize=9)
        paths["moe_expert_load"] = _save(fig, folder / "moe_expert_load.png", plt)
    massive = results.get("massive_activations")
    if massive:
        layers = [entry["layer"] for entry in massive["layers"]]
        top = [abs(entry["top"][0]["value"]) if entry["top"] else np.nan for entry in massive["layers"]]
        median = [entry["median_abs"] for entry in massive["layers"]]
        c = massive["criteria"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(layers, top, marker="o", label="largest |x|")
        ax.plot(layers, median, marker="s", label="median |x|")
        ax.plot(layers, [c["min_ratio_to_median"] * m for m in median], linestyle=":", label=f"{c['min_ratio_to_median']:g} x median")
        ax.axhline(c["min_magnitude"], color="tab:red", linestyle="--", linewidth=1, label=f"{c['min_magnitude']:g}")
        for entry in massive["layers"]:
            if entry["massive"]:
                m = entry["massive"][0]
                ax.annotate(f"d{m['dim']} {m.get('token', '')}", (entry["layer"], abs(m["value"])),
                            textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
        ax.set_yscale("log")
        ax.set_xticks(layers)
        ax.set_xlabel("layer (residual stream after it)")
        ax.set_ylabel("|x|")
        ax.legend(fontsize=7)
        ax.set_title("Massive activations across depth (annotated: dim and token of the largest)", fontsize=9)
        paths["massive_activations"] = _save(fig, folder / "massive_activations.png", plt)
    return paths
