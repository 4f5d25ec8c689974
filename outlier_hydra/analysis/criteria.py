"""The analysis stage: OutlierStats + criteria -> one record per systematic feature dimension.

Per feature dim d (M hooked modules, N analysed token positions):
  total_occurrences = #(m, p) with |x_m[p, d]| >= threshold
  layer_percentage  = #{m : d has an outlier in m} / M             (a fraction in [0, 1])
  seq_percentage    = #{p : |x_m[p, d]| >= threshold for some m} / N
  max_magnitude     = max |x|
  example_values    = up to num_examples signed outlier values, largest |x| first, at distinct token
                      positions (each position's largest-|x| value across the hooked modules)
  layers_affected   = names of the modules with an outlier in d, in model order
d is systematic when layer_percentage >= min_layer_percentage and seq_percentage >= min_seq_percentage.
The comparisons are exact (integer arithmetic against the minimum as written), so 3 of 12 modules
meets 0.25 and 6 of 100 positions meets 0.06. The threshold may be any edge of the statistics'
histograms (so one collection serves a whole threshold sweep); another threshold is an error.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from outlier_hydra.stats import OutlierStats

# the fields of a feature record, in the order tables show them (report.html, W&B)
FEATURE_FIELDS = [
    "feature_dim", "max_magnitude", "layer_percentage", "seq_percentage", "total_occurrences",
    "layers_affected", "example_values", "batches_systematic",
]  # fmt: skip


def criteria_text(c: dict, ge: str = ">=") -> str:
    """The criteria as a sentence: '|x| >= 6 in >= 25% of modules and >= 6% of positions' (ge: the sign)."""
    return (
        f"|x| {ge} {c['magnitude_threshold']:g} in {ge} {100 * c['min_layer_percentage']:g}% of modules and "
        f"{ge} {100 * c['min_seq_percentage']:g}% of positions"
    )


def meets(count: np.ndarray, total: int, minimum: float) -> np.ndarray:
    """count / total >= minimum, exactly, for the decimal the user wrote (repr: the shortest decimal
    that is that float, so 0.06 is 6/100, not the binary float just above it)."""
    frac = Fraction(repr(float(minimum)))
    return np.asarray(count, dtype=object) * frac.denominator >= frac.numerator * total


class SystematicOutlierAnalysis:
    def __init__(
        self,
        magnitude_threshold: float,
        min_layer_percentage: float,
        min_seq_percentage: float,
        num_examples: int = 5,
    ):
        self.magnitude_threshold = float(magnitude_threshold)
        self.min_layer_percentage = float(min_layer_percentage)
        self.min_seq_percentage = float(min_seq_percentage)
        self.num_examples = int(num_examples)

    @property
    def criteria(self) -> dict:
        return {
            "magnitude_threshold": self.magnitude_threshold,
            "min_layer_percentage": self.min_layer_percentage,
            "min_seq_percentage": self.min_seq_percentage,
        }

    def systematic_dims(self, stats: OutlierStats) -> np.ndarray:
        self._check(stats)
        t = self.magnitude_threshold
        layers_with = (stats.occurrences(t) > 0).sum(0)
        ok = meets(layers_with, stats.num_modules, self.min_layer_percentage) & meets(
            stats.positions_hit(t), stats.num_tokens, self.min_seq_percentage
        )
        return np.flatnonzero(ok.astype(bool))

    def records(self, stats: OutlierStats) -> list[dict]:
        """Records of the systematic features, largest max_magnitude first (then lowest dim)."""
        dims = self.systematic_dims(stats)
        out = [self.record(stats, int(d)) for d in dims]
        out.sort(key=lambda r: (-r["max_magnitude"], r["feature_dim"]))
        return out

    def record(self, stats: OutlierStats, d: int) -> dict:
        t = self.magnitude_threshold
        occ = stats.occurrences(t)[:, d]
        hit_modules = np.flatnonzero(occ > 0)
        tops = stats.top_values[:, d]
        examples = [float(v) for v in tops if np.isfinite(v) and abs(v) >= self.magnitude_threshold]
        return {
            "feature_dim": d,
            "max_magnitude": float(stats.max_abs[:, d].max()),
            "layer_percentage": len(hit_modules) / stats.num_modules,
            "seq_percentage": int(stats.positions_hit(t)[d]) / stats.num_tokens,
            "total_occurrences": int(occ.sum()),
            "layers_affected": [stats.module_names[m] for m in hit_modules],
            "example_values": examples[: self.num_examples],
        }

    def _check(self, stats: OutlierStats) -> None:
        stats.edge_index(self.magnitude_threshold)  # ThresholdNotAnEdge, naming the edges there are
        if stats.num_tokens <= 0:
            raise ValueError("statistics cover no tokens")

    def analyze(self, total: OutlierStats, batches: list[OutlierStats] | None = None) -> dict:
        """The result document for merged statistics (plus, per feature, in how many batches it met
        the criteria on its own)."""
        records = self.records(total)
        batches = batches or []
        batch_dims = [set(self.systematic_dims(b).tolist()) for b in batches]
        for r in records:
            r["batches_systematic"] = sum(r["feature_dim"] in dims for dims in batch_dims)
        return {
            "criteria": self.criteria,
            "num_hooked_modules": total.num_modules,
            "hooked_modules": list(total.module_names),
            "num_tokens": total.num_tokens,
            "num_batches": total.num_batches,
            "nonfinite_values": {total.module_names[m]: int(n) for m, n in enumerate(total.nonfinite) if n},
            "num_systematic_outliers": len(records),
            "systematic_outliers": records,
        }
