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
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING

from outlier_hydra.stages.protocol import ArrayStats, Reach, ReportContext, Stage

LOG_MIN, LOG_MAX, BINS_PER_DECADE = -6.0, 6.0, 10
NUM_BINS = int((LOG_MAX - LOG_MIN) * BINS_PER_DECADE)


@dataclass
class MassiveStats(ArrayStats):
    layers: np.ndarray  # [L]
    log_hist: np.ndarray  # [L, NUM_BINS + 2] int64 (first: below 1e-6 incl. 0, last: above 1e6)
    top: np.ndarray  # [L, k, 4] float64: value, sequence, position, dim (NaN rows = none)

    def merge(self, other: MassiveStats) -> MassiveStats:
        k = self.top.shape[1]
        both = np.concatenate([self.top, other.top], 1)
        out = np.empty_like(self.top)
        for i in range(both.shape[0]):
            rows = both[i]
            mag = np.where(np.isnan(rows[:, 0]), -np.inf, np.abs(rows[:, 0]))
            order = np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], -mag))
            out[i] = rows[order[:k]]
        return MassiveStats(self.layers, self.log_hist + other.log_hist, out)

    def median(self, row: int) -> float:
        h = self.log_hist[row]
        half = h.sum() / 2
        b = int(np.searchsorted(np.cumsum(h), half))
        if b == 0:
            return 0.0
        lo = LOG_MIN + (b - 1) / BINS_PER_DECADE
        return float(10 ** (lo + 0.5 / BINS_PER_DECADE))  # the bin's geometric centre


@dataclass
class MassiveActivationsConfig:
    """conf/analysis/stages/massive_activations.yaml"""

    enabled: bool = MISSING
    min_magnitude: float = MISSING
    min_ratio_to_median: float = MISSING
    top_k: int = MISSING


class MassiveActivations(Stage):
    name = "massive_activations"
    Config = MassiveActivationsConfig
    Stats = MassiveStats

    def __init__(self, config):
        super().__init__(config)
        self.min_magnitude = float(config.min_magnitude)
        self.min_ratio = float(config.min_ratio_to_median)
        self.k = int(config.top_k)

    def start_batch(self, first_sequence: int) -> None:
        self.first = first_sequence
        self.state: dict[int, tuple] = {}

    def stop_after(self, layer: int) -> tuple[Reach, str]:
        """The forward must reach the output of the pass's last layer."""
        return Reach.LAYER_OUTPUT, self.structure.layer_path(layer)

    def hooks(self, layers: list[int]):
        return [(self.structure.layer_path(i), self._hook(i)) for i in layers]

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
            # clamped into the two outer bins (histc drops what lies outside its range); histc counts
            # in float32, exact up to 2**24: per part of at most that many values, summed as integers
            logs = torch.log10(a.clamp_min(1e-30)).reshape(-1)
            logs = logs.clamp(LOG_MIN - 0.5 / BINS_PER_DECADE, LOG_MAX + 0.5 / BINS_PER_DECADE)
            lo, hi = LOG_MIN - 1 / BINS_PER_DECADE, LOG_MAX + 1 / BINS_PER_DECADE
            hist = sum(torch.histc(part, bins=NUM_BINS + 2, min=lo, max=hi).long() for part in logs.split(2**24))
            self.state[layer] = (rows.double(), hist)

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
            hist[i] = h
        self.state = {}
        empty = MassiveStats(np.asarray(self.layers), np.zeros_like(hist), np.full_like(top, np.nan))
        return empty.merge(MassiveStats(np.asarray(self.layers), hist, top))  # canonical order

    def report(self, stats: MassiveStats, ctx: ReportContext) -> dict:
        m, tokenizer, token_ids, first_seq = stats, ctx.tokenizer, ctx.token_ids, ctx.first_sequence
        out = []
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
            out.append({"layer": layer, "median_abs": median, "top": tops, "massive": [t for t in tops if t["massive"]]})
        return {"criteria": {"min_magnitude": self.min_magnitude, "min_ratio_to_median": self.min_ratio}, "layers": out}

    # ---- outputs ----------------------------------------------------------------------------
    # pragma: no mutate start (drawing only: the numbers drawn are the section's, tested there)
    def plots(self, section: dict, folder: Path) -> dict[str, Path]:
        """massive_activations.png: largest and median |x| per layer against the criteria."""
        from outlier_hydra.figures import pyplot, save_figure

        plt = pyplot()
        layers = [entry["layer"] for entry in section["layers"]]
        top = [abs(entry["top"][0]["value"]) if entry["top"] else np.nan for entry in section["layers"]]
        median = [entry["median_abs"] for entry in section["layers"]]
        c = section["criteria"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(layers, top, marker="o", label="largest |x|")
        ax.plot(layers, median, marker="s", label="median |x|")
        ax.plot(
            layers,
            [c["min_ratio_to_median"] * m for m in median],
            linestyle=":",
            label=f"{c['min_ratio_to_median']:g} x median",
        )
        ax.axhline(c["min_magnitude"], color="tab:red", linestyle="--", linewidth=1, label=f"{c['min_magnitude']:g}")
        for entry in section["layers"]:
            if entry["massive"]:
                m = entry["massive"][0]
                ax.annotate(
                    f"d{m['dim']} {m.get('token', '')}",
                    (entry["layer"], abs(m["value"])),
                    textcoords="offset points",
                    xytext=(0, 6),
                    fontsize=7,
                    ha="center",
                )
        ax.set_yscale("log")
        ax.set_xticks(layers)
        ax.set_xlabel("layer (residual stream after it)")
        ax.set_ylabel("|x|")
        ax.legend(fontsize=7)
        ax.set_title("Massive activations across depth (annotated: dim and token of the largest)", fontsize=9)
        return {"massive_activations": save_figure(fig, folder / "massive_activations.png")}

    # pragma: no mutate end
    def rows(self, section: dict) -> dict[str, tuple[list[str], list[list]]]:
        rows = [
            [e["layer"], m["value"], m["dim"], m["sequence"], m["position"], m.get("token", "")]
            for e in section["layers"]
            for m in e["massive"]
        ]
        return {"massive": (["layer", "value", "dim", "sequence", "position", "token"], rows)}

    def summary(self, section: dict) -> list[str]:
        found = [(entry["layer"], m) for entry in section["layers"] for m in entry["massive"]]
        if not found:
            return ["no massive activations"]
        dims = sorted({m["dim"] for _, m in found})
        return [f"{len(found)} massive activations in {len({layer for layer, _ in found})} layers, dims {dims}"]
