"""The summary of a sweep directory after the fact (a `-m` run writes it itself when it ends).

    outlier-hydra sweep-summary multirun/2026-11-27/10-00-00 [allowed_targets=[my_pkg.]]

sweep_summary.json / .csv and sweep_systematic_vs_threshold.png in the sweep directory, and the
merge of every complete group of shard jobs (see launch/sweep.py).
"""

from __future__ import annotations

from pathlib import Path

from outlier_hydra.cli import no_more, settings
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.launch.sweep import merge_shard_groups, write_summary


def command(paths: list[Path], overrides: list[str], out: Path | None) -> str:
    if len(paths) != 1 or not paths[0].is_dir() or out is not None:
        raise OutlierHydraError("sweep-summary: give one sweep directory")
    given = settings(overrides)
    allowed = list(given.pop("allowed_targets", []))
    no_more(given, "sweep-summary")
    rows = write_summary(paths[0])
    merged = merge_shard_groups(paths[0], allowed)
    return f"{len(rows)} jobs -> {paths[0] / 'sweep_summary.csv'}" + "".join(f"; merged shards -> {m}" for m in merged)
