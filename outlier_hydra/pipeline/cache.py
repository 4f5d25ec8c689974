"""Reuse collected statistics across runs that differ only in analysis-only keys.

A threshold or percentage sweep (`-m analysis.magnitude_threshold=4,6,8`) needs the model once: the
statistics hold exact counts at every histogram edge. The key is everything that determines the
activations and what is collected from them: the model section, the dataset section, the layers,
the batch size, the collector's class, the effective edges and the number of examples. A different
model, dtype, corpus, token window, layer set or edge set never matches; the token ids are compared
too before anything is reused.

Entries live in `analysis.statistics_cache` (a directory), or, in a Hydra multirun with that unset,
in `<sweep dir>/.statistics_cache`, so the jobs of one sweep share them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from outlier_hydra.config.runtime import multirun_sweep_dir
from outlier_hydra.pipeline.rundir import TOKEN_IDS

log = logging.getLogger(__name__)


def cache_key(plain_cfg: dict, edges: Sequence[float] | np.ndarray, collector_target: str, stages: Sequence = ()) -> str:
    """stages: the "collect" stages that apply; each adds its own cache_key() (what it collects)."""
    a = plain_cfg["analysis"]
    material = {
        "stages": {s.name: s.cache_key() for s in sorted(stages, key=lambda s: s.name)},
        "model": plain_cfg["model"],
        "dataset": plain_cfg["dataset"],
        "layers": a["layers"],
        "batch_size": a["batch_size"],
        "num_examples": a["num_examples"],
        "collector": collector_target,
        "edges": [float(e) for e in edges],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir(cfg) -> Path | None:
    """The configured cache, else the sweep's own one in a Hydra multirun, else none."""
    if not cfg.analysis.reuse_statistics:
        return None
    if cfg.analysis.statistics_cache:
        return Path(os.path.expanduser(cfg.analysis.statistics_cache))
    sweep = multirun_sweep_dir()
    return sweep / ".statistics_cache" if sweep is not None else None


def fetch(root: Path | None, key: str, token_ids: np.ndarray, stats_dir: Path) -> bool:
    """Copy a matching entry's batch statistics into stats_dir; False if there is none."""
    if root is None:
        return False
    entry = root / key
    if not (entry / "complete").exists():
        return False
    if not np.array_equal(np.load(entry / TOKEN_IDS), token_ids):
        log.warning("statistics cache %s: same key, different tokens; collecting again", entry)
        return False
    stats_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(entry.glob("batch_*.npz")):
        shutil.copy2(f, stats_dir / f.name)
    log.info("reusing statistics from %s (the model is not loaded)", entry)
    return True


def store(root: Path | None, key: str, token_ids: np.ndarray, stats_dir: Path) -> None:
    """Publish a finished run's batch statistics: a complete folder renamed into place, so readers
    see all of it or nothing, and of several jobs publishing the same entry the first one wins.
    A failure to publish (a full disk) leaves nothing behind and does not fail the run."""
    if root is None or (root / key / "complete").exists():
        return
    tmp = root / f".{key}.{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for f in sorted(stats_dir.glob("batch_*.npz")):
            shutil.copy2(f, tmp / f.name)
        np.save(tmp / TOKEN_IDS, token_ids)
        (tmp / "complete").write_text("")
        tmp.rename(root / key)
    except OSError as exc:  # another job published the same entry first, or no space
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / key / "complete").exists():
            log.warning("statistics cache %s: not published (%s)", root / key, exc)
