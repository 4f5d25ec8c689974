"""OutlierStats: the small, plain statistics a run keeps, and how they merge exactly.

For M hooked modules, D feature dims and E edges (ascending, > 0; the configured magnitude
threshold is always one of them), with pmax[p, d] = max over hooked modules of |x_m[p, d]|:
  ge_counts[M, D, E]   int64    #(p : |x_m[p, d]| >= edges[e])                      merge: add
  pos_ge_counts[D, E]  int64    #(p : pmax[p, d] >= edges[e])                       merge: add
  max_abs[M, D]        float32  largest finite |x|                                  merge: max
  top_values[k, D]     float32  signed values of largest |x| at k distinct token     merge: top-k of
                                positions (each position's largest-|x| value over          the union
                                the modules), >= edges[0]; NaN = none
  nonfinite[M]         int64    NaN/Inf values seen (excluded from everything else) merge: add
  num_tokens, num_batches                                                           merge: add
At any threshold t that is an edge, the exact statistics are one column:
  occurrences(t)[m, d] = #(p : |x_m[p, d]| >= t)       = ge_counts[m, d, e(t)]
  positions_hit(t)[d]  = #(p : pmax[p, d] >= t)        = pos_ge_counts[d, e(t)]
Token positions of different batches (and shards) are distinct, so the position histogram adds
exactly. Every merge is exact and independent of order and grouping (top-k ties: larger value first).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np

from outlier_hydra.errors import OutlierHydraError

# 5: the experts stage's top outputs per unit; 4: a SHA-256 of the arrays in the metadata; 3: stages
# named by their registered name (2: a class path)
FORMAT_VERSION = 5

# Edges for |x|: the thresholds people sweep (3..8), the range of systematic features (up to ~100)
# and massive activations (>= 1000). The configured threshold is always added. The lowest edge
# bounds what the statistics see at all: values below it only enter max_abs. It is also what the
# CPU reduction pays for: about 0.3% of normal activations reach 3, 4.6% reach 2.
DEFAULT_EDGES = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0, 20.0, 32.0, 64.0, 100.0, 1000.0)


class ThresholdNotAnEdge(ValueError):
    """The statistics cannot give exact counts at this threshold."""


def histogram_edges(edges, threshold: float) -> np.ndarray:
    """The sorted, de-duplicated edges with the threshold included."""
    out = np.unique(np.asarray([*edges, threshold], dtype=np.float64))
    if out[0] <= 0:
        raise ValueError(f"histogram edges must be > 0, got {out[0]}")
    return out


@dataclass
class OutlierStats:
    module_names: list[str]
    edges: np.ndarray
    threshold: float  # the configured threshold the run was made for (an edge)
    num_tokens: int
    ge_counts: np.ndarray
    pos_ge_counts: np.ndarray
    max_abs: np.ndarray
    top_values: np.ndarray
    nonfinite: np.ndarray
    num_batches: int = 1
    meta: dict = field(default_factory=dict)  # provenance (batch index, sequences ...), not merged
    # what "collect" stages gathered (stages/): stage name -> object with merge(), to_arrays() and a
    # from_arrays() classmethod; saved under the stage's name, rebuilt by load() from stage_stats
    extras: dict = field(default_factory=dict)

    @property
    def num_modules(self) -> int:
        return len(self.module_names)

    @property
    def num_features(self) -> int:
        return int(self.max_abs.shape[1])

    def edge_index(self, threshold: float) -> int:
        idx = np.flatnonzero(self.edges == float(threshold))
        if not len(idx):
            raise ThresholdNotAnEdge(
                f"magnitude_threshold {threshold:g} is not a histogram edge of these statistics "
                f"(edges: {', '.join(f'{e:g}' for e in self.edges)}); collect again with it in analysis.histogram_edges"
            )
        return int(idx[0])

    def occurrences(self, threshold: float | None = None) -> np.ndarray:
        """[M, D] count of |x| >= threshold (default: the configured one)."""
        e = self.edge_index(self.threshold if threshold is None else threshold)
        return self.ge_counts[:, :, e]

    def positions_hit(self, threshold: float | None = None) -> np.ndarray:
        """[D] positions where the dim reaches threshold in at least one hooked module."""
        e = self.edge_index(self.threshold if threshold is None else threshold)
        return self.pos_ge_counts[:, e]

    # ---- merge -------------------------------------------------------------------------------
    def merge(self, other: OutlierStats) -> OutlierStats:
        if self.module_names != other.module_names:
            raise ValueError("cannot merge statistics of different hooked modules")
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge statistics with different histogram edges")
        if self.max_abs.shape != other.max_abs.shape or self.top_values.shape != other.top_values.shape:
            raise ValueError("cannot merge statistics of different shapes")
        return OutlierStats(
            module_names=list(self.module_names),
            edges=self.edges,
            threshold=self.threshold,
            num_tokens=self.num_tokens + other.num_tokens,
            ge_counts=self.ge_counts + other.ge_counts,
            pos_ge_counts=self.pos_ge_counts + other.pos_ge_counts,
            max_abs=np.maximum(self.max_abs, other.max_abs),
            top_values=merge_top_values(self.top_values, other.top_values),
            nonfinite=self.nonfinite + other.nonfinite,
            num_batches=self.num_batches + other.num_batches,
            extras=_merge_extras(self.extras, other.extras),
        )

    # ---- files -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The .npz file's bytes (written atomically by the caller). Counts that fit are stored as
        int32 (a batch's always do): half the disk, restored to int64 on load. The metadata carries
        a SHA-256 of every array, so that a file changed after it was written is never used."""
        small = self.num_tokens < 2**31
        arrays = {
            "edges": self.edges,
            "ge_counts": self.ge_counts.astype(np.int32) if small else self.ge_counts,
            "pos_ge_counts": self.pos_ge_counts.astype(np.int32) if small else self.pos_ge_counts,
            "max_abs": self.max_abs,
            "top_values": self.top_values,
            "nonfinite": self.nonfinite,
            **{f"extra.{name}.{k}": v for name, x in self.extras.items() for k, v in x.to_arrays().items()},
        }
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "module_names": self.module_names,
            "threshold": self.threshold,
            "num_tokens": self.num_tokens,
            "num_batches": self.num_batches,
            "meta": self.meta,
            "extras": sorted(self.extras),
            "sha256": _checksum(arrays),
        }
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | os.PathLike, stage_stats: Mapping[str, Any] | None = None) -> OutlierStats:
        """Read a file written from to_bytes(). stage_stats: stage name -> its statistics class; a
        file holding a stage not in it is refused (a file never decides what code runs). A file
        that is truncated, altered, or of another format version raises DamagedStats."""
        stage_stats = stage_stats or {}
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(bytes(arrays.pop("meta")).decode())
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise DamagedStats(f"{path}: damaged statistics file ({type(exc).__name__}: {str(exc)[:80]})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DamagedStats(
                f"{path}: statistics format {meta.get('format_version')}, this version reads {FORMAT_VERSION}"
            )
        if meta.get("sha256") != _checksum(arrays):
            raise DamagedStats(f"{path}: checksum mismatch, the file changed after it was written")
        extras = {}
        for name in meta.get("extras", []):
            if name not in stage_stats:
                raise OutlierHydraError(
                    f"{path}: holds statistics of the stage {name!r}, which is not configured "
                    f"(configured: {', '.join(sorted(stage_stats)) or 'none'})"
                )
            prefix = f"extra.{name}."
            extras[name] = stage_stats[name].from_arrays(
                {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            )
        return cls(
            extras=extras,
            module_names=meta["module_names"],
            edges=arrays["edges"],
            threshold=meta["threshold"],
            num_tokens=meta["num_tokens"],
            num_batches=meta["num_batches"],
            meta=meta.get("meta", {}),
            ge_counts=arrays["ge_counts"].astype(np.int64),
            pos_ge_counts=arrays["pos_ge_counts"].astype(np.int64),
            max_abs=arrays["max_abs"],
            top_values=arrays["top_values"],
            nonfinite=arrays["nonfinite"],
        )


class DamagedStats(OutlierHydraError):
    """A statistics file that cannot be trusted: truncated, altered, or of another format version."""


def _checksum(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _merge_extras(a: dict, b: dict) -> dict:
    if a.keys() != b.keys():
        raise ValueError(f"cannot merge statistics of different stages ({sorted(a)} vs {sorted(b)})")
    return {name: a[name].merge(b[name]) for name in a}


def merge_all(stats: list[OutlierStats]) -> OutlierStats:
    if not stats:
        raise ValueError("no statistics to merge")
    return reduce(OutlierStats.merge, stats)


def merge_top_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column, the k values of largest |v| among a and b; ties: larger value first; NaN last."""
    k = a.shape[0]
    both = np.concatenate([a, b], axis=0)
    magnitude = np.where(np.isnan(both), -np.inf, np.abs(both))
    value = np.where(np.isnan(both), -np.inf, both)
    order = np.lexsort((-value, -magnitude), axis=0)  # primary: |v| desc, then v desc
    return np.take_along_axis(both, order, axis=0)[:k].astype(np.float32)
