"""Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models").

In the residual stream (each decoder layer's output), per layer:
  - the top_k values of largest |x| with their (sequence, token position, dim) and token id;
  - a histogram of log10|x| (fixed bins) from which the layer's median |x| is read;
  - the massive ones: |x| > min_magnitude and |x| > min_ratio_to_median x the layer median.
Top-k merges as the top-k of the union, histograms add, so shards and batches merge exactly.
The median is read off the histogram: exact to the bin (10 bins per decade, so within ~12%).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LOG_MIN, LOG_MAX, BINS_PER_DECADE = -6.0, 6.0, 10
NUM_BINS = int((LOG_MAX - LOG_MIN) * BINS_PER_DECADE)


@dataclass
class MassiveStats:
    layers: np.ndarray  # [L]
    log_hist: np.ndarray  # [L, NUM_BINS + 2] int64 (first: below 1e-6 incl. 0, last: above 1e6)
    top: np.ndarray  # [L, k, 4] float64: value, sequence, position, dim (NaN rows = none)

    def merge(self, other: "MassiveStats") -> "MassiveStats":
        k = self.top.shape[1]
        both = np.concatenate([self.top, other.top], 1)
        out = np.empty_like(self.top)
        for i in range(both.shape[0]):
            rows = both[i]
            mag = np.where(np.isnan(rows[:, 0]), -np.inf, np.abs(rows[:, 0]))
            order = np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], -mag))
            out[i] = rows[order[:k]]
        return MassiveStats(self.layers, self.log_hist + other.log_hist, out)

    def to_arrays(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_arrays(cls, arrays: dict) -> "MassiveStats":
        return cls(**{k: np.asarray(v) for k, v in arrays.items()})

    def median(self, row: int) -> float:
        h = self.log_hist[row]
        half = h.sum() / 2
        b = int(np.searchsorted(np.cumsum(h), half))
        if b == 0:
            return 0.0
        lo = LOG_MIN + (b - 1) / BINS_PER_DECADE
        return float(10 ** (lo + 0.5 / BINS_PER_DECADE))  # the bin's geometric centre


class MassiveActivationStage:
    name = "massive_activations"

    def __init__(self, min_magnitude: float = 100.0, min_ratio_to_median: float = 1000.0, top_k: int = 20):
        self.min_magnitude = float(min_magnitude)
        self.min_ratio = float(min_ratio_to_median)
        self.k = int(top_k)

    def bind(self, adapter, layers: list[int], threshold: float) -> bool:
        if adapter.layer is None:
            return False
        self.adapter, self.layers = adapter, sorted(layers)
        return True

    def start_batch(self, first_sequence: int) -> None:
        self.first = first_sequence
        self.state: dict[int, tuple] = {}

    def stop_after(self, layer: int) -> tuple[int, str]:
        """(rank, module) the forward must reach in the pass's last layer: the layer output (rank 2)."""
        return 2, self.adapter.layer(layer)

    def hooks(self, layers: list[int]):
        return [(self.adapter.layer(i), self._hook(i)) for i in layers]

    def _hook(self, layer: int):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            x = x.detach()
            b, t, d = x.shape
            a = x.abs().float()
            a = torch.where(a < float("inf"), a, torch.zeros((), device=a.device))
            k = min(self.k, a.numel())
            vals, flat = a.reshape(-1).topk(k)
            signed = x.reshape(-1)[flat].float()
            rows = torch.stack([signed, (flat // (t * d)).float(), ((flat // d) % t).float(), (flat % d).float()], 1)
            logs = torch.log10(a.clamp_min(1e-30)).reshape(-1)
            hist = torch.histc(logs.clamp(LOG_MIN - 1, LOG_MAX + 1), bins=NUM_BINS + 2,
                               min=LOG_MIN - 1 / BINS_PER_DECADE, max=LOG_MAX + 1 / BINS_PER_DECADE)
            self.state[layer] = (rows.double(), hist.double())

        return hook

    def finish_batch(self) -> MassiveStats:
        n = len(self.layers)
        top = np.full((n, self.k, 4), np.nan)
        hist = np.zeros((n, NUM_BINS + 2), np.int64)
        for i, layer in enumerate(self.layers):
            if layer not in self.state:
                continue
            rows, h = (v.cpu().numpy() for v in self.state[layer])
            rows[:, 1] += self.first  # batch-local sequence -> global sequence index
            top[i, : len(rows)] = rows
            hist[i] = np.rint(h).astype(np.int64)
        self.state = {}
        empty = MassiveStats(np.asarray(self.layers), np.zeros_like(hist), np.full_like(top, np.nan))
        return empty.merge(MassiveStats(np.asarray(self.layers), hist, top))  # canonical order

    def report(self, stats, records: list[dict], tokenizer=None, token_ids: np.ndarray | None = None,
               first_sequence: int = 0) -> dict:
        m: MassiveStats = stats.extras[self.name]
        out = []
        first_seq = first_sequence
        for i, layer in enumerate(m.layers.tolist()):
            median = m.median(i)
            tops = []
            for value, seq, pos, dim in m.top[i]:
                if np.isnan(value):
                    continue
                entry = {"value": float(value), "sequence": int(seq), "position": int(pos), "dim": int(dim)}
                if token_ids is not None and 0 <= int(seq) - first_seq < len(token_ids):
                    tok = int(token_ids[int(seq) - first_seq, int(pos)])
                    entry["token_id"] = tok
                    if tokenizer is not None:
                        entry["token"] = tokenizer.convert_ids_to_tokens(tok)
                entry["massive"] = bool(abs(value) > self.min_magnitude and abs(value) > self.min_ratio * median)
                tops.append(entry)
            out.append({"layer": layer, "median_abs": median, "top": tops,
                        "massive": [t for t in tops if t["massive"]]})
        return {"criteria": {"min_magnitude": self.min_magnitude, "min_ratio_to_median": self.min_ratio},
                "layers": out}
