"""A stage from outside the package, added the documented way: this module plus its YAML file
(tests/conf/analysis/stages/outlier_positions.yaml). Per analysed layer, how many token positions
have at least one |x| >= threshold at the MLP input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING

from outlier_hydra.collect.hooks import on_input
from outlier_hydra.stages import ReportContext, Stage


@dataclass
class OutlierPositionsConfig:
    enabled: bool = MISSING
    magnitude_threshold: float = MISSING


@dataclass
class OutlierPositionsStats:
    layers: np.ndarray  # [L]
    tokens: np.ndarray  # [L] int64
    hits: np.ndarray  # [L] int64

    def merge(self, other: OutlierPositionsStats) -> OutlierPositionsStats:
        return OutlierPositionsStats(self.layers, self.tokens + other.tokens, self.hits + other.hits)

    def to_arrays(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_arrays(cls, arrays: dict) -> OutlierPositionsStats:
        return cls(**{k: np.asarray(v) for k, v in arrays.items()})


class OutlierPositions(Stage):
    name = "outlier_positions"
    Config = OutlierPositionsConfig
    Stats = OutlierPositionsStats

    def start_batch(self, first_sequence: int) -> None:
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hooks(self, layers):
        """A pre-hook on each MLP input (the layer_{i}_ln_mlp hook points)."""
        points = self.structure.hook_points(layers)
        return [on_input(p.module_path, p.at, self._hook(p.layer)) for p in points if p.name.endswith("_ln_mlp")]

    def _hook(self, layer: int):
        def hook(x):
            x = x.detach().reshape(-1, x.shape[-1])
            hit = (x.abs() >= self.config.magnitude_threshold).any(-1).sum()
            self.state[layer] = (torch.tensor(x.shape[0]), hit)

        return hook

    def finish_batch(self) -> OutlierPositionsStats:
        tokens = np.array([int(self.state[i][0]) for i in self.layers], np.int64)
        hits = np.array([int(self.state[i][1]) for i in self.layers], np.int64)
        return OutlierPositionsStats(np.asarray(self.layers, np.int64), tokens, hits)

    def report(self, stats: OutlierPositionsStats, ctx: ReportContext) -> dict:
        return {
            "layers": [
                {"layer": int(layer), "tokens": int(t), "outlier_positions": int(h)}
                for layer, t, h in zip(stats.layers, stats.tokens, stats.hits)
            ]
        }

    def plots(self, section: dict, folder: Path) -> dict[str, Path]:
        from outlier_hydra.figures import pyplot, save_figure

        fig, ax = pyplot().subplots()
        ax.bar([e["layer"] for e in section["layers"]], [e["outlier_positions"] for e in section["layers"]])
        return {"outlier_positions": save_figure(fig, folder / "outlier_positions.png")}

    def summary(self, section: dict) -> list[str]:
        return [f"{sum(e['outlier_positions'] for e in section['layers'])} outlier positions"]
