"""The extraction stage: forward hooks that reduce each hooked tensor on the model's device.

For every hooked module m and batch, with a = |x| (NaN/Inf counted, then treated as 0):
  ge_counts[m, :, e] += #(a >= edges[e]) per dim       max_abs[m] = max(max_abs[m], amax(a))
  pabs, pval          : per token position and dim, the largest |x| over the modules so far and
                        its signed value (a [tokens, D] buffer per device; ties keep the earlier)
When the batch is done: pos_ge_counts from pabs, the top-k positions of pabs give top_values, and
everything is copied to the host once per device (batch_state.py). Memory: O(tokens_per_batch x D) on
the device, O(M x D x E) on the host; nothing grows with the number of tokens analysed. The reduction
itself is one of five interchangeable backends (backends.py, ``backend``).

Each batch is one forward pass, which stops right after the last module anything reads (the layers
after the last analysed one never run). With ``chunk_layers`` at most that many layers' statistics
live on the device at once: when the pass reaches the next group of layers, the finished group's
counts and maxima are copied to the host (pinned memory, non-blocking: no host sync inside a hook).
The results are identical and the pass is the same one, so chunking costs nothing. (The position
buffer, [tokens, D], stays on the device for the whole pass: every module updates it.)

"collect" stages (stages/: router statistics, massive activations) hook the same passes and hand
back their own mergeable statistics, which land in OutlierStats.extras under the stage's name.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from outlier_hydra.collect import fused_cpu, fused_triton
from outlier_hydra.collect.backends import BACKENDS
from outlier_hydra.collect.batch_state import BatchState
from outlier_hydra.collect.hooks import Reach, attached, on_input
from outlier_hydra.collect.reductions import compile_errors, kernel_fallback
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models.types import HookPoint
from outlier_hydra.stats import DEFAULT_EDGES, OutlierStats, histogram_edges

log = logging.getLogger(__name__)
CHOICES = ("auto", *BACKENDS)  # analysis.collector.backend


class _StopForward(Exception):
    """Raised by the last hook of a pass: the rest of the forward is not needed."""


def layer_chunks(points: list[HookPoint], chunk_layers: int | None) -> list[list[HookPoint]]:
    """Group hook points (model order) into groups of at most chunk_layers layers each."""
    layers = sorted({p.layer for p in points})
    if not chunk_layers or chunk_layers >= len(layers):
        return [list(points)]
    groups = [set(layers[i : i + chunk_layers]) for i in range(0, len(layers), chunk_layers)]
    return [[p for p in points if p.layer in g] for g in groups]


class OutlierCollector:
    """Builds one OutlierStats per batch from forward hooks on the hook points."""

    def __init__(
        self,
        magnitude_threshold: float,
        num_examples: int = 5,
        chunk_layers: int | None = None,
        histogram_edges: list[float] | None = None,
        backend: str = "auto",
        early_stop: bool = True,
    ):
        if backend not in CHOICES:
            raise OutlierHydraError(f"analysis.collector.backend: {backend!r} is not one of {', '.join(CHOICES)}")
        self.magnitude_threshold = float(magnitude_threshold)
        self.num_examples = int(num_examples)
        self.chunk_layers = chunk_layers
        self.edges = histogram_edges_for(histogram_edges, self.magnitude_threshold)
        self.backend = backend
        self.early_stop = early_stop  # stop each pass after the last module anything reads

    def chunk_of_row(self, points: list[HookPoint]) -> list[int]:
        """For each hook point, the group of layers whose statistics share the device (chunk_layers)."""
        chunk = {p.name: c for c, group in enumerate(layer_chunks(points, self.chunk_layers)) for p in group}
        return [chunk[p.name] for p in points]

    def backend_for(self, device: torch.device) -> str:
        """The reduction for a model on `device`: on the CPU the one-pass C++ kernel where it builds
        (else the sparse reduction, same statistics), on CUDA the one-pass Triton kernel (else
        torch.compile's), the sparse reduction elsewhere."""
        if self.backend in ("auto", "fused") and device.type == "cpu":
            return "fused" if fused_cpu.available() else "sparse"
        if self.backend == "fused":
            raise OutlierHydraError(f"analysis.collector.backend: fused runs on the CPU only, the model is on {device}")
        if self.backend == "triton" and not fused_triton.available(device.type):
            raise OutlierHydraError(
                f"analysis.collector.backend: triton needs a CUDA device and the triton package, the model is on "
                f"{device}"
                + (" (on the CPU: only in Triton's interpreter, TRITON_INTERPRET=1)" if device.type == "cpu" else "")
            )
        if self.backend != "auto":
            return self.backend
        if device.type == "cuda":
            return "triton" if fused_triton.available("cuda") else "compiled"
        return "sparse"

    @torch.inference_mode()
    def collect_batch(
        self, model: torch.nn.Module, points: list[HookPoint], input_ids: torch.Tensor, stages=(), first_sequence: int = 0
    ) -> OutlierStats:
        """One batch: its OutlierStats (the stages' statistics in .extras, the reduction used in
        .meta["backend"])."""
        backend = self.backend_for(input_ids.device)
        try:
            stats = self._collect(model, points, input_ids, backend, stages, first_sequence)
        except compile_errors() as exc:
            if backend not in ("compiled", "triton"):
                raise
            kernel_fallback("torch.compile" if backend == "compiled" else "Triton", exc, "the dense reduction")
            self.backend = backend = "dense"
            stats = self._collect(model, points, input_ids, backend, stages, first_sequence)
        stats.meta["backend"] = backend
        return stats

    def _collect(self, model, points, input_ids, backend, stages, first_sequence) -> OutlierStats:
        row_of = {p.name: i for i, p in enumerate(points)}
        state = BatchState(self.edges, self.num_examples, len(points), BACKENDS[backend](), self.chunk_of_row(points))
        for stage in stages:
            stage.prepare(model, input_ids)
            stage.start_batch(first_sequence)
        layers = sorted({p.layer for p in points})
        hooks = [on_input(p.module_path, p.at, self._update(state, row_of[p.name])) for p in points]
        for stage in stages:
            hooks += stage.hooks(layers)
        # stop as early as everything hooked allows: right after the last hook point's input, or
        # later in the last layer if a stage reads further (the router, the experts, the layer output)
        stops = [s.stop_after(layers[-1]) for s in stages]
        _, stop_path, *kind = max([(Reach.HOOK_POINT, points[-1].module_path, "pre")] + [s for s in stops if s is not None])
        if self.early_stop:
            hooks.append((stop_path, _stop, *kind))
        try:
            with attached(model, hooks):
                model(input_ids=input_ids)
        except _StopForward:
            pass
        finally:
            for stage in stages:
                stage.end_pass()
        stats = state.to_host([p.name for p in points], self.magnitude_threshold)
        stats.extras = {stage.name: stage.finish_batch() for stage in stages}
        return stats

    @staticmethod
    def _update(state: BatchState, row: int):
        def update(x):
            state.update(row, x)

        return update


def _stop(*_hook_args):
    """The hook that ends the pass (a forward hook or a pre-hook: both raise)."""
    raise _StopForward


def histogram_edges_for(edges: list[float] | None, threshold: float) -> np.ndarray:
    try:
        return histogram_edges(DEFAULT_EDGES if edges is None else edges, threshold)
    except ValueError as exc:
        raise OutlierHydraError(f"analysis.histogram_edges: {exc}") from None
