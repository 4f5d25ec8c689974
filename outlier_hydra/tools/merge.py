"""Merge finished runs (shards over disjoint sequences) into one result, exactly.

    outlier-hydra merge RUN_DIR [RUN_DIR ...] --out MERGED_DIR [allowed_targets=[my_pkg.]]

Each run directory holds its per-batch statistics (stats/batch_*.npz). The runs must agree on
everything but which sequences they covered (model, layers, criteria, sequence length), and their
sequences must not overlap; the merged final_analysis_results.json equals the one a single run over
all those sequences would write (same batches -> identical, including batches_systematic).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from outlier_hydra.analysis import build_documents, collector_section
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.output.report import run_report
from outlier_hydra.pipeline import rundir
from outlier_hydra.tools.args import no_more, settings
from outlier_hydra.tools.saved_run import load_run, report_context

# keys that may differ between shards of one run
SHARD_KEYS = {"dataset.num_sequences", "dataset.skip_sequences", "dataset.num_shards", "dataset.shard_index"}


def identity(config: dict) -> dict:
    """What shards of one run share: everything but which sequences they cover."""
    flat = rundir.flatten({k: config[k] for k in rundir.RESULT_KEYS})
    return {k: v for k, v in flat.items() if k not in SHARD_KEYS}


def merge_runs(run_dirs: list[Path], out: Path, allowed: Sequence[str] = ()) -> dict:
    run_dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, list(allowed)) for d in run_dirs]
    first = identity(runs[0].config)
    for run in runs[1:]:
        other = identity(run.config)
        diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diff:
            raise OutlierHydraError(
                f"{run.path}: differs from {run_dirs[0]} in {', '.join(diff[:5])}; not shards of one run"
            )
    batches = sorted((b for run in runs for b in run.batches), key=lambda b: b.meta["sequences"][0])
    for prev, nxt in zip(batches, batches[1:]):
        if nxt.meta["sequences"][0] < prev.meta["sequences"][1]:
            raise OutlierHydraError(
                f"overlapping sequences {prev.meta['sequences']} and {nxt.meta['sequences']}: not disjoint shards"
            )
    runs.sort(key=lambda r: r.results["dataset"]["skip_sequences"])
    base = runs[0]
    header = {
        "model": base.results["model"],
        "dataset": {
            "num_sequences": sum(r.results["dataset"]["num_sequences"] for r in runs),
            "sequence_length": base.results["dataset"]["sequence_length"],
            "skip_sequences": base.results["dataset"]["skip_sequences"],
        },
        "collector": collector_section(batches),
    }
    context = report_context(base)
    context["token_ids"] = np.concatenate([np.load(r.path / rundir.TOKEN_IDS) for r in runs])
    per_batch, results, total = build_documents(header, base.analyzer(), batches, base.stages, **context)
    out.mkdir(parents=True, exist_ok=True)
    stats_dir = out / rundir.STATS_DIR
    stats_dir.mkdir(exist_ok=True)
    for i, b in enumerate(batches):
        rundir.save_stats(stats_dir / rundir.batch_stats_name(i), b)
    rundir.write_json(out / "merged_from.json", [str(d) for d in run_dirs])
    rundir.write_json(out / rundir.CONFIG_JSON, base.config)
    rundir.save_token_ids(out / rundir.TOKEN_IDS, context["token_ids"])
    rundir.write_documents(out, per_batch, results, total)
    run_report(out, results, {}, base.stages)
    return results


def command(paths: list[Path], overrides: list[str], out: Path | None) -> str:
    if not paths or out is None:
        raise OutlierHydraError("merge: give the run directories and --out DIR")
    given = settings(overrides)
    allowed = list(given.pop("allowed_targets", []))
    no_more(given, "merge")
    merged = merge_runs(paths, out, allowed)
    return f"{merged['num_systematic_outliers']} systematic features over {merged['num_tokens']} tokens -> {out / rundir.FINAL_RESULTS}"
