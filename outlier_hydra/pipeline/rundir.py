"""The run directory: its file names, atomic writes, claiming it, and reading it back.

Every file is written atomically (a temporary file in the same folder, fsync, rename), so a file
that exists is complete. ``run_state.json`` records the config fingerprint of the run that owns the
directory: a rerun with the same config resumes it (finished batches are kept), any other refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.files import atomic_write_bytes, read_json, write_json
from outlier_hydra.stats import OutlierStats

FINAL_RESULTS = "final_analysis_results.json"
TOKEN_IDS = "token_ids.npy"
CONFIG_JSON = "config.json"
STATS_DIR = "stats"
FINAL_STATS = "statistics.npz"
RUN_STATE = "run_state.json"
TIMING = "timing.json"
ENVIRONMENT = "environment.json"
PLOTS_DIR = "plots"
# Config sections that determine the results; logger, deployment and display keys do not.
RESULT_KEYS = ("model", "dataset", "analysis")


def batch_results_name(index: int) -> str:
    return f"batch_{index + 1:03d}_results.json"


def batch_stats_name(index: int) -> str:
    return f"batch_{index + 1:03d}.npz"


def save_stats(path: str | os.PathLike, stats: OutlierStats) -> None:
    atomic_write_bytes(path, stats.to_bytes())


def save_token_ids(path: str | os.PathLike, token_ids: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, token_ids)
    atomic_write_bytes(path, buf.getvalue())


def flatten(d: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config keys as the user types them."""
    out: dict = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def fingerprint(plain: dict) -> dict:
    sections = {k: plain[k] for k in RESULT_KEYS}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "config": sections}


def claim(out: Path, plain: dict, token_ids: np.ndarray) -> None:
    """First run in `out`: record what it runs. A rerun: refuse unless it is the same run."""
    fp = fingerprint(plain)
    state_path = out / RUN_STATE
    for stale in out.rglob(".*.tmp-*") if out.exists() else ():
        stale.unlink()  # left by a write that was killed halfway; the real file was never replaced
    if state_path.exists():
        old = read_json(state_path)
        if old.get("sha256") != fp["sha256"]:
            a, b = flatten(old.get("config", {})), flatten(fp["config"])
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            # the collector and analyzer copy analysis.* by interpolation: name the key the user set
            direct = [k for k in diff if not k.startswith(("analysis.collector.", "analysis.analyzer."))]
            diff = direct or diff
            raise OutlierHydraError(
                f"{out}: holds a run with a different config ({', '.join(diff[:5]) or 'unknown keys'} differ); "
                "use a new hydra.run.dir"
            )
        if not np.array_equal(np.load(out / TOKEN_IDS), token_ids):
            raise OutlierHydraError(
                f"{out}: holds a run over different tokens (the dataset changed); use a new hydra.run.dir"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    save_token_ids(out / TOKEN_IDS, token_ids)
    write_json(state_path, fp)


def move_aside(path: Path) -> Path:
    """A statistics file that cannot be used is kept for inspection, out of every glob that reads."""
    n = 0
    while (aside := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    os.replace(path, aside)
    return aside


def batch_stats_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / STATS_DIR).glob("batch_*.npz"))


def load_batches(run_dir: Path, stage_stats: Mapping[str, Any]) -> list[OutlierStats]:
    return [OutlierStats.load(p, stage_stats) for p in batch_stats_files(run_dir)]


def write_documents(out: Path, per_batch: list[dict], final: dict, total: OutlierStats) -> None:
    """Batch files, the merged statistics, then the final document last: if it exists, all do."""
    for b, doc in enumerate(per_batch):
        write_json(out / batch_results_name(b), doc)
    save_stats(out / FINAL_STATS, total)
    write_json(out / FINAL_RESULTS, final)
