"""The experts stage's statistics: per unit (a routed expert, a shared expert, or a dense MLP: an
"expert" of one) plain arrays that merge exactly. Sums add; each maximum keeps its record from the
batch that holds it (equal values: the earlier token); the top outputs are the top_tokens largest of
both sides by the same rule (tensors.accumulate is the same rule on the device, within a batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from outlier_hydra.stages.protocol import ArrayStats

KINDS = ("routed", "shared", "dense")
RECORD = ("out_max", "out_dim", "out_token", "col", "weight", "contribution")  # moves with out_max
RECORD_IN = ("in_max", "in_channel", "in_token")  # moves with in_max
TOP = ("top_out", "top_dim", "top_token")  # [experts, top_tokens] each: the largest row maxima
UNKNOWN_TOKEN = 2**60  # rows whose token the experts implementation does not reveal (sorts after all)


@dataclass
class ExpertStats(ArrayStats):
    keys: np.ndarray  # [R, 4] int64: layer, kind (0 routed, 1 shared, 2 dense), unit index, expert
    tokens: np.ndarray  # [R] int64
    out_max: np.ndarray  # [R] float64 (-1: never ran)
    out_dim: np.ndarray  # [R] int64
    out_token: np.ndarray  # [R] int64 global token index (sequence * length + position)
    col: np.ndarray  # [R] int64 input channel of the largest contribution at that token
    weight: np.ndarray  # [R] float64 W[out_dim, col]
    contribution: np.ndarray  # [R] float64 W[out_dim, col] * x[col] at that token
    in_max: np.ndarray  # [R] float64
    in_channel: np.ndarray  # [R] int64
    in_token: np.ndarray  # [R] int64 global token index of max |x|
    median_abs_weight: np.ndarray  # [R] float64
    count_keys: np.ndarray  # [K, 2] int64 (row, dim), sorted
    counts: np.ndarray  # [K] int64
    top_out: np.ndarray  # [R, T] float64: the T largest row maxima |y| of the unit, largest first (-1: none)
    top_dim: np.ndarray  # [R, T] int64: the hidden dim of each
    top_token: np.ndarray  # [R, T] int64: its global token index (equal values: the earlier token first)
    # the units the stage could not read, and why (the same in every batch of one model)
    unobserved_keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))  # layer, kind, index
    unobserved_module: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))  # the module
    unobserved_reason: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))

    def merge(self, other: ExpertStats) -> ExpertStats:
        if not np.array_equal(self.keys, other.keys) or not np.array_equal(self.unobserved_keys, other.unobserved_keys):
            raise ValueError("expert statistics of different units")
        a, b = self, other
        b_wins = (b.out_max > a.out_max) | ((b.out_max == a.out_max) & (b.out_token < a.out_token) & (b.out_max >= 0))
        rec = {k: np.where(b_wins, getattr(b, k), getattr(a, k)) for k in RECORD}
        in_b = (b.in_max > a.in_max) | ((b.in_max == a.in_max) & (b.in_token < a.in_token) & (b.in_max >= 0))
        counts: dict[tuple[int, int], int] = {}
        for s in (a, b):
            for (r, d), c in zip(s.count_keys.tolist(), s.counts.tolist()):
                counts[(r, d)] = counts.get((r, d), 0) + c
        keys = sorted(counts)
        both = {k: np.concatenate([getattr(a, k), getattr(b, k)], axis=1) for k in TOP}
        order = np.lexsort((both["top_token"], -both["top_out"]), axis=1)[:, : a.top_out.shape[1]]
        return ExpertStats(
            keys=a.keys,
            tokens=a.tokens + b.tokens,
            **rec,
            **{k: np.where(in_b, getattr(b, k), getattr(a, k)) for k in RECORD_IN},
            median_abs_weight=np.where(a.median_abs_weight >= 0, a.median_abs_weight, b.median_abs_weight),
            count_keys=np.asarray(keys, np.int64).reshape(-1, 2),
            counts=np.asarray([counts[k] for k in keys], np.int64),
            **{k: np.take_along_axis(v, order, axis=1) for k, v in both.items()},
            unobserved_keys=a.unobserved_keys,
            unobserved_module=a.unobserved_module,
            unobserved_reason=a.unobserved_reason,
        )
