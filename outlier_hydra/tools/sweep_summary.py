"""One table (and a plot) per sweep: what each job found.

Written by a Hydra callback when a `-m` sweep ends (SweepSummary, named in conf/config.yaml; on the
submitting host, after every job has returned), and by hand for any sweep directory:

    outlier-hydra sweep-summary multirun/2026-11-27/10-00-00 [allowed_targets=[my_pkg.]]

sweep_summary.json / sweep_summary.csv: a row per job with its overrides, the number of systematic
features and the top dims with their percentages (jobs that did not finish say so);
sweep_systematic_vs_threshold.png: systematic-feature count against the threshold, a line per
combination of the other overrides. Jobs that are the shards of one run (a sweep over
dataset.shard_index) are merged into merged/ (merged_<n>/ for several groups) once every shard of
the group has finished: the same files a single run over all the sequences writes.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.pipeline import rundir
from outlier_hydra.tools.args import no_more, settings

TOP = 5


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return list(OmegaConf.load(path))


def summarize(sweep_dir: Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()),
        key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name),
    )
    rows = []
    for d in jobs:
        row: dict[str, Any] = {"job": d.name, "overrides": " ".join(_overrides(d))}
        final = d / rundir.FINAL_RESULTS
        if not final.exists():
            rows.append({**row, "status": "not finished"})
            continue
        r = rundir.read_json(final)
        top = r["systematic_outliers"][:TOP]
        rows.append(
            {
                **row,
                "status": "done",
                "magnitude_threshold": r["criteria"]["magnitude_threshold"],
                "min_layer_percentage": r["criteria"]["min_layer_percentage"],
                "min_seq_percentage": r["criteria"]["min_seq_percentage"],
                "num_systematic_outliers": r["num_systematic_outliers"],
                "num_tokens": r["num_tokens"],
                "top_dims": [t["feature_dim"] for t in top],
                "top_layer_percentages": [t["layer_percentage"] for t in top],
                "top_seq_percentages": [t["seq_percentage"] for t in top],
            }
        )
    return rows


def write_summary(sweep_dir: Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    rundir.write_json(sweep_dir / "sweep_summary.json", rows)
    columns = [
        "job",
        "overrides",
        "status",
        "magnitude_threshold",
        "min_layer_percentage",
        "min_seq_percentage",
        "num_systematic_outliers",
        "num_tokens",
        "top_dims",
        "top_layer_percentages",
        "top_seq_percentages",
    ]
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow(
                {
                    k: (" ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, list) else v)
                    for k, v in row.items()
                }
            )
    plot = _plot(sweep_dir, rows)
    from outlier_hydra.output.report import sweep_report

    sweep_report(sweep_dir, rows, columns, plot)
    return rows


def _plot(sweep_dir: Path, rows: list[dict]) -> Path | None:
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return None
    from outlier_hydra.figures import pyplot, save_figure

    plt = pyplot()
    lines = defaultdict(list)
    for r in done:
        others = " ".join(o for o in r["overrides"].split() if not o.startswith("analysis.magnitude_threshold="))
        lines[others or "all jobs"].append((r["magnitude_threshold"], r["num_systematic_outliers"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label[:60])
    ax.set_xlabel("magnitude threshold")
    ax.set_ylabel("systematic outlier features")
    ax.set_title(f"Sweep {sweep_dir.name}", fontsize=9)
    if len(lines) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, sweep_dir / "sweep_systematic_vs_threshold.png")


def merge_shard_groups(sweep_dir: Path, allowed_targets: Sequence[str] = ()) -> list[Path]:
    """Merge every complete group of shard jobs; returns the merged directories."""
    import json

    from outlier_hydra.tools.merge import identity, merge_runs

    groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    shards_of: dict[str, int] = {}
    for d in sorted(Path(sweep_dir).iterdir()):
        if not (d / rundir.FINAL_RESULTS).exists() or not (d / rundir.CONFIG_JSON).exists():
            continue
        config = rundir.read_json(d / rundir.CONFIG_JSON)
        if config["dataset"].get("num_shards", 1) > 1:
            key = json.dumps(identity(config), sort_keys=True)
            groups[key].append((config["dataset"]["shard_index"], d))
            shards_of[key] = config["dataset"]["num_shards"]
    merged = []
    for i, (key, members) in enumerate(sorted(groups.items())):
        if sorted(k for k, _ in members) != list(range(shards_of[key])):
            continue  # some shard did not finish: nothing to merge yet
        target = Path(sweep_dir) / ("merged" if len(groups) == 1 else f"merged_{i}")
        merge_runs([d for _, d in sorted(members)], target, list(allowed_targets))
        merged.append(target)
    return merged


class SweepSummary(Callback):
    """hydra.callbacks entry: writes the summary (and merges shard groups) when a multirun ends."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            write_summary(sweep_dir)
            merge_shard_groups(sweep_dir, list(config.get("allowed_targets") or []))


def command(paths: list[Path], overrides: list[str], out: Path | None) -> str:
    if len(paths) != 1 or not paths[0].is_dir() or out is not None:
        raise OutlierHydraError("sweep-summary: give one sweep directory")
    given = settings(overrides)
    allowed = list(given.pop("allowed_targets", []))
    no_more(given, "sweep-summary")
    rows = write_summary(paths[0])
    merged = merge_shard_groups(paths[0], allowed)
    return f"{len(rows)} jobs -> {paths[0] / 'sweep_summary.csv'}" + "".join(f"; merged shards -> {m}" for m in merged)
