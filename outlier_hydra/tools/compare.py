"""Compare finished runs side by side: a table, plots and a report page.

    outlier-hydra compare RUN_OR_SWEEP_DIR... [--out DIR] [--reanalyze [analysis.KEY=VALUE ...]]

A sweep directory stands for every finished run in it. Writes comparison.json, comparison.csv, three
plots and report.html into --out (default outputs/compare/<date>/<time>) and prints the table:

  model, model type, dense or MoE, total and active parameters (counted on the meta device), hooked
  modules, tokens, systematic dims, mean and median layer % and seq % of the systematic dims, their
  largest magnitude, the top 5 dims with their percentages, for MoE the top expert's share of the
  top-k choices at the systematic dims' outlier positions (mean over those dims), its super experts
  (layer, expert and max |down_proj output|) when the experts stage ran, and counts of massive
  activations when that stage ran.

Runs analysed at different criteria are refused, unless --reanalyze applies one set of criteria (the
first run's, changed by analysis.* overrides) to all of them from their statistics, with no model.
Runs over different numbers of tokens are compared, and the table says so.
"""

from __future__ import annotations

import csv
import statistics as st
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from outlier_hydra.analysis import build_documents, criteria_text
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models.label import short_name
from outlier_hydra.pipeline import rundir
from outlier_hydra.stats import OutlierStats
from outlier_hydra.tools.args import settings
from outlier_hydra.tools.reanalyze import ANALYSIS_ONLY
from outlier_hydra.tools.saved_run import SavedRun, load_run

COLUMNS = [
    "run",
    "model",
    "model_type",
    "kind",
    "total_params",
    "active_params",
    "hooked_modules",
    "tokens",
    "systematic_dims",
    "mean_layer_pct",
    "median_layer_pct",
    "mean_seq_pct",
    "median_seq_pct",
    "max_magnitude",
    "top_dims",
    "router_top_expert_share",
    "super_experts",
    "massive_activations",
]


def run_dirs(paths: list[Path]) -> list[Path]:
    """Each path is a run (it holds final_analysis_results.json) or a sweep (its finished runs)."""
    out = []
    for p in paths:
        if (p / rundir.FINAL_RESULTS).is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(
                (d for d in p.iterdir() if (d / rundir.FINAL_RESULTS).is_file()),
                key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name),
            )
            if not found:
                raise OutlierHydraError(f"{p}: neither a finished run nor a sweep holding one")
            out += found
        else:
            raise OutlierHydraError(f"{p}: no such directory")
    return out


def parameters(run: SavedRun) -> tuple[int | None, int | None, bool | None]:
    """(total, active, is MoE) from the checkpoint's config (or the model group's architecture)."""
    from transformers.utils import logging as hf_logging

    from outlier_hydra.models.size import count_params, hf_config

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # building a model on the meta device may warn; nothing is loaded
    try:
        config, _ = hf_config(run.cfg.model)
        total, active, *_ = count_params(config)
    except Exception:  # noqa: BLE001 - a model whose shape cannot be read still compares
        return None, None, None
    finally:
        hf_logging.set_verbosity(verbosity)
    experts = next(
        (getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts") if getattr(config, k, None)),
        None,
    )
    return total, active, bool(experts and experts > 1)


def row(run: SavedRun, results: dict) -> dict[str, Any]:
    feats = results["systematic_outliers"]
    total, active, moe = parameters(run)
    moe = moe if moe is not None else "moe_routing" in results
    layer = [100 * f["layer_percentage"] for f in feats]
    seq = [100 * f["seq_percentage"] for f in feats]
    routing = results.get("moe_routing")
    shares = [
        f["top_experts_all_layers"][0]["share"] for f in (routing or {}).get("features", []) if f["top_experts_all_layers"]
    ]
    massive = results.get("massive_activations")
    experts = results.get("experts")
    return {
        "run": str(run.path),
        "model": results["model"]["name"],
        "model_type": results["model"]["model_type"],
        "kind": "MoE" if moe else "dense",
        "total_params": total,
        "active_params": active,
        "hooked_modules": results["num_hooked_modules"],
        "tokens": results["num_tokens"],
        "systematic_dims": len(feats),
        "mean_layer_pct": st.mean(layer) if layer else None,
        "median_layer_pct": st.median(layer) if layer else None,
        "mean_seq_pct": st.mean(seq) if seq else None,
        "median_seq_pct": st.median(seq) if seq else None,
        "max_magnitude": max((f["max_magnitude"] for f in feats), default=None),
        "top_dims": [
            f"{f['feature_dim']} ({100 * f['layer_percentage']:.0f}%/{100 * f['seq_percentage']:.0f}%)" for f in feats[:5]
        ],
        "router_top_expert_share": st.mean(shares) if shares else None,
        "super_experts": (
            [f"L{s['layer']} E{s['expert']} ({s['max_output']:.3g})" for s in experts["super_experts"]] if experts else None
        ),
        "massive_activations": sum(len(e["massive"]) for e in massive["layers"]) if massive else None,
    }


def reanalysed(run: SavedRun, overrides: dict) -> tuple[dict, Any]:
    """The run's documents at other criteria, from its statistics (no model)."""
    analyzer = run.analyzer(run.config_with(overrides).analysis.analyzer)
    header = {k: run.results[k] for k in ("model", "dataset", "collector") if k in run.results}
    _, results, total = build_documents(
        header, analyzer, run.batches, run.stages, tokenizer=None, token_ids=None, first_sequence=0
    )
    return results, total


def compare(
    paths: list[Path], out: Path, reanalyze: bool = False, overrides: dict | None = None, allowed: Sequence[str] = ()
) -> dict:
    runs = [load_run(p, list(allowed)) for p in run_dirs(paths)]
    overrides = dict(overrides or {})
    if reanalyze:
        base = {k: runs[0].results["criteria"][k] for k in ANALYSIS_ONLY[:3]}
        overrides = {**base, **overrides}
        docs = [reanalysed(r, overrides) for r in runs]
    else:
        if overrides:
            raise OutlierHydraError(f"{next(iter(overrides))}: criteria for all runs need --reanalyze")
        differ = [r for r in runs if r.results["criteria"] != runs[0].results["criteria"]]
        if differ:
            raise OutlierHydraError(
                f"{differ[0].path}: analysed at other criteria than {runs[0].path} ({differ[0].results['criteria']} vs "
                f"{runs[0].results['criteria']}); add --reanalyze to apply one set to all from their statistics"
            )
        docs = [(r.results, OutlierStats.load(r.path / rundir.FINAL_STATS, r.stages.stats_classes)) for r in runs]
    rows = [row(r, res) for r, (res, _) in zip(runs, docs)]
    tokens = sorted({r["tokens"] for r in rows})
    notes = [
        f"criteria: {criteria_text(docs[0][0]['criteria'])}" + (" (reanalysed from the statistics)" if reanalyze else "")
    ]
    if len(tokens) > 1:
        notes.append(
            f"the runs cover different numbers of tokens ({', '.join(map(str, tokens))}): percentages are "
            "per run, counts are not comparable"
        )
    out.mkdir(parents=True, exist_ok=True)
    plots = comparison_plots(out, runs, docs)
    document = {
        "criteria": docs[0][0]["criteria"],
        "reanalysed": reanalyze,
        "notes": notes,
        "runs": rows,
        "plots": {k: str(v) for k, v in plots.items()},
    }
    rundir.write_json(out / "comparison.json", document)
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "; ".join(v) if isinstance(v, list) else v for k, v in r.items()})
    from outlier_hydra.output.report import comparison_report

    comparison_report(out, rows, COLUMNS, plots, notes)
    return document


def _label(run: SavedRun, results: dict) -> str:
    return f"{short_name(results['model']['name'])} ({results['model']['model_type']})"


def comparison_plots(out: Path, runs: list[SavedRun], docs: list[tuple[dict, Any]]) -> dict[str, Path]:
    import numpy as np

    from outlier_hydra.analysis import SystematicOutlierAnalysis
    from outlier_hydra.figures import pyplot, save_figure

    plt = pyplot()
    paths = {}
    # 1. systematic dims against the threshold, from each run's statistics (every edge)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, (results, total) in zip(runs, docs):
        c = results["criteria"]
        counts = [
            len(
                SystematicOutlierAnalysis(float(t), c["min_layer_percentage"], c["min_seq_percentage"]).systematic_dims(
                    total
                )
            )
            for t in total.edges
        ]
        ax.plot(total.edges, counts, marker="o", markersize=3, label=_label(run, results))
    ax.set_xscale("log")
    ax.set_xlabel("magnitude threshold")
    ax.set_ylabel("systematic dims")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("Systematic dims against the threshold (same percentage criteria)", fontsize=9)
    paths["systematic_vs_threshold"] = save_figure(fig, out / "systematic_vs_threshold.png")
    # 2. depth profile: per hooked module, the share of the run's systematic dims with an outlier there
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, (results, total) in zip(runs, docs):
        dims = [f["feature_dim"] for f in results["systematic_outliers"]]
        if not dims:
            continue
        occ = total.occurrences(results["criteria"]["magnitude_threshold"])[:, dims]
        depth = np.linspace(0, 1, total.num_modules) if total.num_modules > 1 else np.zeros(1)
        ax.plot(depth, (occ > 0).mean(1), marker="o", markersize=3, label=_label(run, results))
    ax.set_xlabel("relative depth (hooked modules in model order, 0 to 1)")
    ax.set_ylabel("share of systematic dims with outliers")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("Where the systematic features have outliers, by depth", fontsize=9)
    paths["depth_profile"] = save_figure(fig, out / "depth_profile.png")
    # 3. layer % against seq % of every systematic dim
    fig, ax = plt.subplots(figsize=(6, 5))
    for run, (results, _) in zip(runs, docs):
        feats = results["systematic_outliers"]
        ax.scatter(
            [100 * f["layer_percentage"] for f in feats],
            [100 * f["seq_percentage"] for f in feats],
            s=18,
            alpha=0.7,
            label=_label(run, results),
        )
    c = docs[0][0]["criteria"]
    ax.axvline(100 * c["min_layer_percentage"], color="grey", linestyle="--", linewidth=1)
    ax.axhline(100 * c["min_seq_percentage"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("layer % (share of hooked modules)")
    ax.set_ylabel("seq % (share of token positions)")
    ax.legend(fontsize=7)
    ax.set_title("Every systematic dim: layer % against seq %", fontsize=9)
    paths["layer_vs_seq"] = save_figure(fig, out / "layer_vs_seq.png")
    return paths


def print_table(document: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = {"model": "model", "kind": "kind", "total_params": "params", "active_params": "active", "tokens": "tokens",
             "systematic_dims": "dims", "mean_layer_pct": "layer %", "mean_seq_pct": "seq %", "max_magnitude": "max |x|",
             "router_top_expert_share": "top expert"}  # fmt: skip
    table = Table()
    for c, title in shown.items():
        table.add_column(title, justify="left" if c in ("model", "kind") else "right")
    for r in document["runs"]:
        table.add_row(*[_fmt(c, r[c]) for c in shown])
    console = Console()
    console.width = max(console.width, 132)  # the table needs it, also when printing to a file
    for note in document["notes"]:
        console.print(note, soft_wrap=True, markup=False)
    console.print(table)


def _fmt(column: str, v: Any) -> str:
    if v is None:
        return "-"
    if column == "model":
        return short_name(v)
    if column.endswith("_params"):
        return f"{v / 1e9:.2f}B" if v >= 1e8 else f"{v / 1e6:.2f}M"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def command(paths: list[Path], overrides: list[str], out: Path | None, flags: frozenset = frozenset()) -> str:
    if not paths:
        raise OutlierHydraError("compare: give run or sweep directories")
    given = settings(overrides)
    allowed = list(given.pop("allowed_targets", []))
    criteria = {}
    for key in list(given):
        name = key.removeprefix("analysis.")
        if not key.startswith("analysis.") or name not in ANALYSIS_ONLY[:3]:
            raise OutlierHydraError(f"{key}: compare changes only {', '.join('analysis.' + k for k in ANALYSIS_ONLY[:3])}")
        criteria[name] = given.pop(key)
    out = out or Path("outputs/compare") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    document = compare(paths, out, "--reanalyze" in flags, criteria, allowed)
    print_table(document)
    return f"{len(document['runs'])} runs -> {out / 'comparison.csv'}, {out / 'report.html'}"
