"""Merge finished runs (shards over disjoint sequences) into one result, exactly.

    python -m outlier_hydra.merge RUN_DIR [RUN_DIR ...] --out MERGED_DIR

Each run directory holds its per-batch statistics (stats/batch_*.npz). The runs must agree on
everything but which sequences they covered (model, layers, criteria, sequence length), and their
sequences must not overlap; the merged final_analysis_results.json equals the one a single run over
all those sequences would write (same batches -> identical, including batches_systematic).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from outlier_hydra import report
from outlier_hydra.cli import exit_code_of
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.stats import OutlierStats

# keys that may differ between shards of one run
SHARD_KEYS = {"dataset.num_sequences", "dataset.skip_sequences", "dataset.num_shards", "dataset.shard_index"}


def load_run(run_dir: Path) -> tuple[dict, dict, list[OutlierStats]]:
    final = run_dir / report.FINAL_RESULTS
    if not final.is_file():
        raise OutlierHydraError(f"{run_dir}: no {report.FINAL_RESULTS} (the run did not finish)")
    results = report.read_json(final)
    config = report.read_json(run_dir / report.CONFIG_JSON)
    batches = report.load_batches(run_dir)
    if len(batches) != results["num_batches"]:
        raise OutlierHydraError(f"{run_dir}: {len(batches)} batch statistics for {results['num_batches']} batches")
    return config, results, batches


def _identity(config: dict) -> dict:
    """What shards of one run share: everything but which sequences they cover."""
    flat = report.flatten({k: config[k] for k in ("model", "dataset", "analysis")})
    return {k: v for k, v in flat.items() if k not in SHARD_KEYS}


def merge_runs(run_dirs: list[Path], out: Path) -> dict:
    run_dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d) for d in run_dirs]
    first = _identity(runs[0][0])
    for d, (config, _, _) in zip(run_dirs[1:], runs[1:]):
        other = _identity(config)
        diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diff:
            raise OutlierHydraError(f"{d}: differs from {run_dirs[0]} in {', '.join(diff[:5])}; not shards of one run")
    batches = sorted((b for _, _, bs in runs for b in bs), key=lambda b: b.meta["sequences"][0])
    for prev, nxt in zip(batches, batches[1:]):
        if nxt.meta["sequences"][0] < prev.meta["sequences"][1]:
            raise OutlierHydraError(f"overlapping sequences {prev.meta['sequences']} and {nxt.meta['sequences']}: not disjoint shards")
    config0, results0, _ = runs[0]
    analyzer = instantiate(OmegaConf.create(config0["analysis"]["analyzer"]))
    header = {
        "model": results0["model"],
        "dataset": {
            "num_sequences": sum(r["dataset"]["num_sequences"] for _, r, _ in runs),
            "sequence_length": results0["dataset"]["sequence_length"],
            "skip_sequences": min(r["dataset"]["skip_sequences"] for _, r, _ in runs),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    stats_dir = out / report.STATS_DIR
    stats_dir.mkdir(exist_ok=True)
    for i, b in enumerate(batches):
        b.save(stats_dir / report.batch_stats_name(i))
    report.write_json(out / "merged_from.json", [str(d) for d in run_dirs])
    report.write_json(out / report.CONFIG_JSON, config0)
    from outlier_hydra.stages import report_context, stages_for_report

    order = sorted(range(len(runs)), key=lambda i: runs[i][1]["dataset"]["skip_sequences"])
    context = report_context(run_dirs[order[0]], config0, {"dataset": header["dataset"]})
    context["token_ids"] = np.concatenate([np.load(run_dirs[i] / report.TOKEN_IDS) for i in order])
    np.save(out / report.TOKEN_IDS, context["token_ids"])
    results, _ = report.write_results(out, header, analyzer, batches, stages_for_report(config0["analysis"], batches[0]),
                                      **context)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outlier_hydra.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged results")
    args = parser.parse_args(argv)

    def command():
        merged = merge_runs(args.run_dirs, args.out)
        print(f"{merged['num_systematic_outliers']} systematic features over {merged['num_tokens']} tokens "
              f"-> {args.out / report.FINAL_RESULTS}")

    return exit_code_of("outlier_hydra.merge", command)


if __name__ == "__main__":
    sys.exit(main())
