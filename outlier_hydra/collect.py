"""The extraction stage: forward hooks that reduce each hooked tensor on the model's device.

Per batch, every hooked module m updates, on its own device and without any host sync:
  occurrences[m] += (|x| >= t).sum(tokens)      max_abs[m] = max(max_abs[m], |x|.amax(tokens))
  top[dev]        = top-k by |x| of (top[dev] ∪ top-k of x over tokens)
  mask[dev]      |= (|x| >= t)                   (a [tokens, D] bool per device, OR'd over modules)
  nonfinite[m]   += count of NaN / Inf           (those values are zeroed before the statistics)
When the batch is done the per-device state is copied to the host once and becomes an OutlierStats;
positions_hit is the column sum of the OR of the device masks. Memory is O(tokens_per_batch x D) on
the device and O(M x D) on the host: it does not grow with the number of tokens analysed.

With ``chunk_layers`` the hook points are split into groups of at most that many layers, one
forward pass per group over the same batch (the masks persist across the passes). Each pass stops
right after its last hooked module: nothing downstream of it is needed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models.adapters import HookPoint
from outlier_hydra.stats import OutlierStats, merge_top_values


class _StopForward(Exception):
    """Raised by the last hook of a pass: the rest of the forward is not needed."""


def layer_chunks(points: list[HookPoint], chunk_layers: int | None) -> list[list[HookPoint]]:
    """Group hook points (model order) into passes of at most chunk_layers layers each."""
    layers = sorted({p.layer for p in points})
    if not chunk_layers or chunk_layers >= len(layers):
        return [list(points)]
    groups = [set(layers[i : i + chunk_layers]) for i in range(0, len(layers), chunk_layers)]
    return [[p for p in points if p.layer in g] for g in groups]


def resolve_modules(model: torch.nn.Module, points: list[HookPoint]) -> list[torch.nn.Module]:
    modules = dict(model.named_modules())
    missing = [p.module_path for p in points if p.module_path not in modules]
    if missing:
        raise OutlierHydraError(
            f"model.name: {type(model).__name__} has no module {missing[0]!r}; its adapter does not fit this model"
        )
    return [modules[p.module_path] for p in points]


class _BatchState:
    """Device-resident accumulators for one batch."""

    def __init__(self, threshold: float, num_examples: int, num_modules: int):
        self.threshold = threshold
        self.k = num_examples
        self.occurrences: list[torch.Tensor | None] = [None] * num_modules
        self.max_abs: list[torch.Tensor | None] = [None] * num_modules
        self.nonfinite: list[torch.Tensor | None] = [None] * num_modules
        self.mask: dict[torch.device, torch.Tensor] = {}
        self.top: dict[torch.device, torch.Tensor] = {}
        self.num_tokens: int | None = None
        self.num_features: int | None = None

    def update(self, row: int, x: torch.Tensor) -> None:
        d = x.shape[-1]
        x = x.detach().reshape(-1, d)
        n = x.shape[0]
        if self.num_tokens is None:
            self.num_tokens, self.num_features = n, d
        dev = x.device
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=dev))
        a = x.abs()
        hit = a >= self.threshold
        count = hit.sum(0)
        amax = a.amax(0).float()
        bad = (~finite).sum()
        if self.occurrences[row] is None:
            self.occurrences[row], self.max_abs[row], self.nonfinite[row] = count, amax, bad
        else:  # a module hooked in two passes of one batch (never with the shipped adapters)
            self.occurrences[row] += count
            self.max_abs[row] = torch.maximum(self.max_abs[row], amax)
            self.nonfinite[row] += bad
        if dev in self.mask:
            self.mask[dev] |= hit
        else:
            self.mask[dev] = hit
        k = min(self.k, n)
        idx = a.topk(k, dim=0).indices
        cand = x.gather(0, idx).float()
        if dev in self.top:
            cand = torch.cat([self.top[dev], cand], 0)
            keep = cand.abs().topk(min(self.k, cand.shape[0]), dim=0).indices
            cand = cand.gather(0, keep)
        self.top[dev] = cand

    def to_host(self, module_names: list[str]) -> OutlierStats:
        """One host copy per device: stack the rows that live there, then move them."""
        m, d = len(module_names), self.num_features
        occurrences = np.zeros((m, d), np.int64)
        max_abs = np.zeros((m, d), np.float32)
        nonfinite = np.zeros(m, np.int64)
        rows_by_dev: dict[torch.device, list[int]] = defaultdict(list)
        for row, t in enumerate(self.occurrences):
            if t is None:
                raise RuntimeError(f"hooked module {module_names[row]} never ran in the forward pass")
            rows_by_dev[t.device].append(row)
        for dev, rows in rows_by_dev.items():
            occurrences[rows] = torch.stack([self.occurrences[r] for r in rows]).cpu().numpy()
            max_abs[rows] = torch.stack([self.max_abs[r] for r in rows]).cpu().numpy()
            nonfinite[rows] = torch.stack([self.nonfinite[r] for r in rows]).cpu().numpy()
        masks = list(self.mask.values())
        any_hit = masks[0]
        for other in masks[1:]:
            any_hit = any_hit | other.to(any_hit.device)
        positions_hit = any_hit.sum(0).cpu().numpy().astype(np.int64)
        top = np.full((self.k, d), np.nan, np.float32)
        for t in self.top.values():
            vals = t.cpu().numpy()
            pad = np.full((self.k - vals.shape[0], d), np.nan, np.float32)
            top = merge_top_values(top, np.concatenate([vals, pad], 0))
        return OutlierStats(
            module_names=list(module_names),
            threshold=self.threshold,
            num_tokens=int(self.num_tokens),
            occurrences=occurrences,
            max_abs=max_abs,
            top_values=top,
            positions_hit=positions_hit,
            nonfinite=nonfinite,
            num_batches=1,
        )


class OutlierCollector:
    """Builds one OutlierStats per batch from forward hooks on the hook points."""

    def __init__(self, magnitude_threshold: float, num_examples: int = 5, chunk_layers: int | None = None):
        self.magnitude_threshold = float(magnitude_threshold)
        self.num_examples = int(num_examples)
        self.chunk_layers = chunk_layers

    def passes(self, points: list[HookPoint]) -> list[list[HookPoint]]:
        return layer_chunks(points, self.chunk_layers)

    @torch.inference_mode()
    def collect_batch(self, model: torch.nn.Module, points: list[HookPoint], input_ids: torch.Tensor) -> OutlierStats:
        modules = resolve_modules(model, points)
        row_of = {p.name: i for i, p in enumerate(points)}
        state = _BatchState(self.magnitude_threshold, self.num_examples, len(points))
        for group in self.passes(points):
            handles = []
            last = group[-1].name
            for p in group:
                handles.append(modules[row_of[p.name]].register_forward_hook(self._hook(state, row_of[p.name], p.name == last)))
            try:
                model(input_ids=input_ids)
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
        return state.to_host([p.name for p in points])

    @staticmethod
    def _hook(state: _BatchState, row: int, stop: bool):
        def hook(module, args, output):
            state.update(row, output[0] if isinstance(output, tuple) else output)
            if stop:
                raise _StopForward

        return hook
