"""The extraction stage: forward hooks that reduce each hooked tensor on the model's device.

For every hooked module m and batch, with a = |x| (NaN/Inf counted, then treated as 0):
  ge_counts[m, :, e] += #(a >= edges[e]) per dim       max_abs[m] = max(max_abs[m], amax(a))
  pabs, pval          : per token position and dim, the largest |x| over the modules so far and
                        its signed value (a [tokens, D] buffer per device; ties keep the earlier)
When the batch is done: pos_ge_counts from pabs, the top-k positions of pabs give top_values, and
everything is copied to the host once per device. Memory: O(tokens_per_batch x D) on the device,
O(M x D x E) on the host; nothing grows with the number of tokens analysed. The reduction itself is
one of four interchangeable implementations (reductions.py and fused_cpu.py, ``backend``).

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
from collections import defaultdict

import numpy as np
import torch

from outlier_hydra.collect import fused_cpu, fused_triton
from outlier_hydra.collect.hooks import attached, on_input
from outlier_hydra.collect.reductions import (
    BACKENDS,
    compile_errors,
    compiled_reduce,
    dense_reduce,
    edges_on,
    example_order_key,
    position_counts,
    sorted_top,
    sparse_positions,
    sparse_reduce,
    top_positions,
)
from outlier_hydra.collect.transfer import counts_to_host, to_host
from outlier_hydra.errors import OutlierHydraError
from outlier_hydra.models.structure import HookPoint
from outlier_hydra.stats import DEFAULT_EDGES, OutlierStats, histogram_edges

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the last hook of a pass: the rest of the forward is not needed."""


def layer_chunks(points: list[HookPoint], chunk_layers: int | None) -> list[list[HookPoint]]:
    """Group hook points (model order) into groups of at most chunk_layers layers each."""
    layers = sorted({p.layer for p in points})
    if not chunk_layers or chunk_layers >= len(layers):
        return [list(points)]
    groups = [set(layers[i : i + chunk_layers]) for i in range(0, len(layers), chunk_layers)]
    return [[p for p in points if p.layer in g] for g in groups]


class _BatchState:
    """Device-resident accumulators for one batch."""

    def __init__(
        self, edges: np.ndarray, num_examples: int, num_modules: int, backend: str, chunk_of_row: list[int] | None = None
    ):
        self.chunk_of_row = chunk_of_row or [0] * num_modules
        self.chunk = 0  # the group of layers the pass is in
        self.copies_pending = False  # non-blocking copies of flushed chunks not yet waited for
        self.edges = tuple(float(e) for e in edges)
        self.k = num_examples
        self.backend = backend
        self.ge: list[torch.Tensor | None] = [None] * num_modules
        self.max_abs: list[torch.Tensor | None] = [None] * num_modules
        self.nonfinite: list[torch.Tensor | None] = [None] * num_modules
        self.pabs: dict[torch.device, torch.Tensor] = {}
        self.pval: dict[torch.device, torch.Tensor] = {}
        self.num_tokens: int | None = None
        self.num_features: int | None = None

    def flush(self, before_chunk: int) -> None:
        """Copy the counts of every row of earlier chunks to the host (pinned, non-blocking)."""
        for row, chunk in enumerate(self.chunk_of_row):
            if chunk >= before_chunk:
                continue
            for kept in (self.ge, self.max_abs, self.nonfinite):
                t = kept[row]
                if t is not None and t.device.type != "cpu":
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    kept[row] = host.copy_(t, non_blocking=True)
                    self.copies_pending = True

    def update(self, row: int, x: torch.Tensor) -> None:
        if self.chunk_of_row[row] > self.chunk:
            self.flush(self.chunk_of_row[row])
            self.chunk = self.chunk_of_row[row]
        d = x.shape[-1]
        x = x.detach().reshape(-1, d)
        dev = x.device
        if self.num_tokens is None:
            self.num_tokens, self.num_features = x.shape[0], d
        if dev not in self.pval:
            self.pval[dev] = torch.zeros(x.shape, dtype=x.dtype, device=dev)
            if self.backend not in ("fused", "triton"):  # the one-pass reductions keep |pval| instead
                self.pabs[dev] = torch.zeros(x.shape, dtype=x.dtype, device=dev)
        if x.dtype != self.pval[dev].dtype:  # hook points of different dtypes: widen all, exactly
            wide = torch.promote_types(x.dtype, self.pval[dev].dtype)
            x, self.pval[dev] = x.to(wide), self.pval[dev].to(wide)
            if dev in self.pabs:
                self.pabs[dev] = self.pabs[dev].to(wide)
        edges_t = edges_on(self.edges, dev)
        if self.backend == "fused":  # pval updated in place
            ge, amax, bad = fused_cpu.reduce(x, self.pval[dev], edges_t)
        elif self.backend == "triton" and x.dtype in fused_triton.DTYPES:  # pval updated in place
            ge, amax, bad = fused_triton.reduce(x, self.pval[dev], edges_t)
        elif self.backend == "triton":  # a dtype the kernel does not take (float64): the reference
            ge, amax, bad, _, self.pval[dev] = dense_reduce(x, self.pval[dev].abs(), self.pval[dev], edges_t)
        else:
            reduce = {"sparse": sparse_reduce, "compiled": compiled_reduce}.get(self.backend, dense_reduce)
            ge, amax, bad, self.pabs[dev], self.pval[dev] = reduce(x, self.pabs[dev], self.pval[dev], edges_t)
        old_ge, old_max, old_bad = self.ge[row], self.max_abs[row], self.nonfinite[row]
        if old_ge is None or old_max is None or old_bad is None:
            self.ge[row], self.max_abs[row], self.nonfinite[row] = ge, amax.float(), bad
        else:  # a module whose hook fires twice in one pass (a module reused by the model)
            self.ge[row], self.max_abs[row], self.nonfinite[row] = (
                old_ge + ge,
                torch.maximum(old_max, amax.float()),
                old_bad + bad,
            )

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine the devices' position buffers (layers sit on devices in model order); where only
        pval is kept (the one-pass reductions), |pval| is the largest |x|."""
        devs = list(self.pval)
        pabs, pval = self._abs(devs[0]), self.pval[devs[0]]
        for dev in devs[1:]:
            other_abs, other_val = self._abs(dev).to(pabs.device), self.pval[dev].to(pabs.device)
            wins = other_abs > pabs
            pabs, pval = torch.where(wins, other_abs, pabs), torch.where(wins, other_val, pval)
        return pabs, pval

    def _abs(self, dev: torch.device) -> torch.Tensor:
        """The device's |x| buffer: kept, or |pval| where only pval is (made only then)."""
        return self.pabs[dev] if dev in self.pabs else self.pval[dev].abs()

    def to_host(self, module_names: list[str], threshold: float) -> OutlierStats:
        if self.num_features is None or self.num_tokens is None:
            raise RuntimeError("no hooked module ran in the forward pass")
        m, d, e = len(module_names), self.num_features, len(self.edges)
        ge = np.zeros((m, d, e), np.int64)
        max_abs = np.zeros((m, d), np.float32)
        nonfinite = np.zeros(m, np.int64)
        if self.copies_pending:  # the non-blocking copies of flushed chunks are complete
            torch.cuda.synchronize()
        rows_by_dev: dict[torch.device, list[int]] = defaultdict(list)
        for row, t in enumerate(self.ge):
            if t is None:
                raise RuntimeError(f"hooked module {module_names[row]} never ran in the forward pass")
            rows_by_dev[t.device].append(row)
        for rows in rows_by_dev.values():  # one host copy per device and kind
            for host, kept in ((ge, self.ge), (max_abs, self.max_abs), (nonfinite, self.nonfinite)):
                stacked = torch.stack([t for t in (kept[r] for r in rows) if t is not None])
                host[rows] = counts_to_host(stacked) if kept is self.ge else to_host(stacked)  # ge: per token
        if self.backend == "fused":  # CPU only: one position buffer
            (pval,) = self.pval.values()
            pos_ge, top = fused_cpu.positions(pval, edges_on(self.edges, pval.device), self.k)
            return self._stats(module_names, threshold, ge, max_abs, nonfinite, pos_ge, top)
        pabs, pval = self._positions()
        edges_t = edges_on(self.edges, pabs.device)
        if self.backend == "sparse":
            pos_ge, top = sparse_positions(pabs, pval, edges_t, self.k)
        else:
            one_pass = self.backend == "triton" and pval.dtype in fused_triton.DTYPES
            pos_ge = counts_to_host(fused_triton.counts(pval, edges_t) if one_pass else position_counts(pabs, edges_t))
            k = min(self.k, pabs.shape[0])
            values, indices = top_positions(example_order_key(pabs, pval, edges_t), k)
            top = pval.gather(0, indices).float()  # below the lowest edge (key 0): NaN
            top = to_host(torch.where(values > 0, top, torch.full_like(top, float("nan"))))
            if k < self.k:
                top = np.concatenate([top, np.full((self.k - k, d), np.nan, np.float32)])
        return self._stats(module_names, threshold, ge, max_abs, nonfinite, pos_ge, top)

    def _stats(self, module_names, threshold, ge, max_abs, nonfinite, pos_ge, top) -> OutlierStats:
        assert self.num_tokens is not None
        return OutlierStats(
            module_names=list(module_names),
            edges=np.asarray(self.edges, np.float64),
            threshold=threshold,
            num_tokens=int(self.num_tokens),
            ge_counts=ge,
            pos_ge_counts=pos_ge.astype(np.int64),
            max_abs=max_abs,
            top_values=sorted_top(top),
            nonfinite=nonfinite,
            num_batches=1,
        )


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
        if backend not in BACKENDS:
            raise OutlierHydraError(f"analysis.collector.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
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
            log.warning(
                "%s could not build the reduction (%s); using the dense reduction from now on",
                "torch.compile" if backend == "compiled" else "Triton",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            self.backend = backend = "dense"
            stats = self._collect(model, points, input_ids, backend, stages, first_sequence)
        stats.meta["backend"] = backend
        return stats

    def _collect(self, model, points, input_ids, backend, stages, first_sequence) -> OutlierStats:
        row_of = {p.name: i for i, p in enumerate(points)}
        state = _BatchState(self.edges, self.num_examples, len(points), backend, self.chunk_of_row(points))
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
        _, stop_path, *kind = max([(0, points[-1].module_path, "pre")] + [s for s in stops if s is not None])
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
    def _update(state: _BatchState, row: int):
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
