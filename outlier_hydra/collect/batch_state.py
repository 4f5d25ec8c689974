"""One batch's accumulators on the device, and their one copy to the host at the end of the batch.

For every hooked module m, with a = |x| (NaN/Inf counted, then treated as 0):
  ge[m] [D, E] = #(a >= edges[e]) per dim     max_abs[m] [D] = amax(a)     nonfinite[m] = #(NaN, Inf)
and per device the position buffers pval (and, where the backend keeps it, pabs) [tokens, D]: per
token position and dim, the signed value of largest |x| over the modules so far (ties keep the
earlier). With chunk_layers the counts of finished groups of layers go to the host early (pinned,
non-blocking). The reduction itself is the backend's (backends.py).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from outlier_hydra.collect.backends import Backend
from outlier_hydra.collect.reductions import edges_on, sorted_top
from outlier_hydra.collect.transfer import counts_to_host, to_host
from outlier_hydra.stats import OutlierStats


class BatchState:
    """Device-resident accumulators for one batch."""

    def __init__(
        self, edges: np.ndarray, num_examples: int, num_modules: int, backend: Backend, chunk_of_row: list[int] | None = None
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
            if self.backend.keeps_abs:  # the one-pass reductions keep |pval| instead
                self.pabs[dev] = torch.zeros(x.shape, dtype=x.dtype, device=dev)
        if x.dtype != self.pval[dev].dtype:  # hook points of different dtypes: widen all, exactly
            wide = torch.promote_types(x.dtype, self.pval[dev].dtype)
            x, self.pval[dev] = x.to(wide), self.pval[dev].to(wide)
            if dev in self.pabs:
                self.pabs[dev] = self.pabs[dev].to(wide)
        ge, amax, bad, pabs, self.pval[dev] = self.backend.reduce(
            x, self.pabs.get(dev), self.pval[dev], edges_on(self.edges, dev)
        )
        if pabs is not None:
            self.pabs[dev] = pabs
        old_ge, old_max, old_bad = self.ge[row], self.max_abs[row], self.nonfinite[row]
        if old_ge is None or old_max is None or old_bad is None:
            self.ge[row], self.max_abs[row], self.nonfinite[row] = ge, amax.float(), bad
        else:  # a module whose hook fires twice in one pass (a module reused by the model)
            self.ge[row], self.max_abs[row], self.nonfinite[row] = (
                old_ge + ge,
                torch.maximum(old_max, amax.float()),
                old_bad + bad,
            )

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
        buffers = {dev: (self.pabs.get(dev), pval) for dev, pval in self.pval.items()}
        pos_ge, top = self.backend.positions(buffers, edges_on(self.edges, next(iter(self.pval))), self.k)
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
