"""OutlierStats: the small, plain statistics a run keeps, and how they merge exactly.

For M hooked modules, D feature dims, threshold t:
  occurrences[M, D]  int64    count of |x| >= t                          merge: add
  max_abs[M, D]      float32  largest finite |x|                         merge: max
  top_values[k, D]   float32  signed values of largest |x| over all      merge: top-k of the union
                              modules and positions (NaN = none yet)
  positions_hit[D]   int64    token positions where d reaches t in at    merge: add
                              least one hooked module
  nonfinite[M]       int64    NaN/Inf values seen (never counted as       merge: add
                              outliers, never in max_abs)
  num_tokens, num_batches     ints                                        merge: add
Token positions of different batches (and shards) are distinct, so positions_hit adds exactly. Every
merge is exact and independent of order and grouping (top-k ties are broken by value, then sign).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


@dataclass
class OutlierStats:
    module_names: list[str]
    threshold: float
    num_tokens: int
    occurrences: np.ndarray
    max_abs: np.ndarray
    top_values: np.ndarray
    positions_hit: np.ndarray
    nonfinite: np.ndarray
    num_batches: int = 1
    meta: dict = field(default_factory=dict)  # free-form provenance (model, batch indices ...), not merged

    @property
    def num_modules(self) -> int:
        return len(self.module_names)

    @property
    def num_features(self) -> int:
        return int(self.occurrences.shape[1])

    @classmethod
    def empty(cls, module_names: list[str], num_features: int, threshold: float, num_examples: int) -> "OutlierStats":
        m, d = len(module_names), num_features
        return cls(
            module_names=list(module_names),
            threshold=float(threshold),
            num_tokens=0,
            occurrences=np.zeros((m, d), np.int64),
            max_abs=np.zeros((m, d), np.float32),
            top_values=np.full((num_examples, d), np.nan, np.float32),
            positions_hit=np.zeros(d, np.int64),
            nonfinite=np.zeros(m, np.int64),
            num_batches=0,
        )

    # ---- merge -------------------------------------------------------------------------------
    def merge(self, other: "OutlierStats") -> "OutlierStats":
        if self.module_names != other.module_names:
            raise ValueError("cannot merge statistics of different hooked modules")
        if self.threshold != other.threshold:
            raise ValueError(f"cannot merge statistics at thresholds {self.threshold} and {other.threshold}")
        if self.occurrences.shape != other.occurrences.shape or self.top_values.shape != other.top_values.shape:
            raise ValueError("cannot merge statistics of different shapes")
        return OutlierStats(
            module_names=list(self.module_names),
            threshold=self.threshold,
            num_tokens=self.num_tokens + other.num_tokens,
            occurrences=self.occurrences + other.occurrences,
            max_abs=np.maximum(self.max_abs, other.max_abs),
            top_values=merge_top_values(self.top_values, other.top_values),
            positions_hit=self.positions_hit + other.positions_hit,
            nonfinite=self.nonfinite + other.nonfinite,
            num_batches=self.num_batches + other.num_batches,
        )

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same folder, fsync, rename)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "module_names": self.module_names,
            "threshold": self.threshold,
            "num_tokens": self.num_tokens,
            "num_batches": self.num_batches,
            "meta": self.meta,
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            occurrences=self.occurrences,
            max_abs=self.max_abs,
            top_values=self.top_values,
            positions_hit=self.positions_hit,
            nonfinite=self.nonfinite,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OutlierStats":
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: statistics format {meta.get('format_version')} is not {FORMAT_VERSION}")
            return cls(
                module_names=meta["module_names"],
                threshold=meta["threshold"],
                num_tokens=meta["num_tokens"],
                num_batches=meta["num_batches"],
                meta=meta.get("meta", {}),
                occurrences=z["occurrences"],
                max_abs=z["max_abs"],
                top_values=z["top_values"],
                positions_hit=z["positions_hit"],
                nonfinite=z["nonfinite"],
            )


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
