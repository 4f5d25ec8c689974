"""The reductions as objects with one interface: adding a reduction is one class here.

Every backend gives the same statistics, bit for bit (tests/test_collector.py, test_fused_*.py):
  reduce(x, pabs, pval, edges_t)   one hooked tensor x [N, D] -> (ge [D, E], amax [D], nonfinite [],
                                   pabs, pval): the per-dim counts and maxima, and the position buffers
                                   updated (pabs is None where the backend keeps only the signed pval,
                                   whose |pval| is then the position's largest |x|)
  positions(buffers, edges_t, k)   the batch's position buffers ({device: (pabs, pval)}) -> (pos_ge_counts
                                   [D, E], top_values [k, D], NaN where none) on the host
  dense     plain PyTorch, no host sync inside a hook: the reference
  compiled  torch.compile of the dense reduction, one fused kernel per tensor (GPU default without triton)
  sparse    only the values >= the lowest edge (a few percent) are binned and scattered; asks the host
            how many there are, which is free on a CPU
  fused     one pass in C++ over each tensor (fused_cpu.cpp; the CPU default where it builds)
  triton    one pass in Triton over each tensor (fused_triton.py; the CUDA default where triton imports)
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from outlier_hydra.collect import fused_cpu, fused_triton
from outlier_hydra.collect.reductions import (
    compiled_reduce,
    dense_reduce,
    example_order_key,
    position_counts,
    sparse_positions,
    sparse_reduce,
    top_positions,
)
from outlier_hydra.collect.transfer import counts_to_host, to_host


class Backend:
    name: ClassVar[str]
    keeps_abs: ClassVar[bool] = True  # a |x| position buffer beside the signed one

    def reduce(self, x, pabs, pval, edges_t):
        return dense_reduce(x, pabs, pval, edges_t)

    def positions(self, buffers: dict, edges_t: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        pabs, pval = combined(buffers)
        return self.counts(pabs, pval, edges_t), dense_top(pabs, pval, edges_t, k)

    def counts(self, pabs, pval, edges_t) -> np.ndarray:
        return counts_to_host(position_counts(pabs, edges_t))


class Dense(Backend):
    name = "dense"


class Compiled(Backend):
    name = "compiled"

    def reduce(self, x, pabs, pval, edges_t):
        return compiled_reduce(x, pabs, pval, edges_t)


class Sparse(Backend):
    name = "sparse"

    def reduce(self, x, pabs, pval, edges_t):
        return sparse_reduce(x, pabs, pval, edges_t)

    def positions(self, buffers, edges_t, k):
        pabs, pval = combined(buffers)
        return sparse_positions(pabs, pval, edges_t, k)


class FusedCpu(Backend):
    name = "fused"
    keeps_abs = False

    def reduce(self, x, pabs, pval, edges_t):  # pval updated in place
        ge, amax, bad = fused_cpu.reduce(x, pval, edges_t)
        return ge, amax, bad, pabs, pval

    def positions(self, buffers, edges_t, k):  # the CPU only: one position buffer
        ((_, pval),) = buffers.values()
        return fused_cpu.positions(pval, edges_t, k)


class Triton(Backend):
    name = "triton"
    keeps_abs = False

    def reduce(self, x, pabs, pval, edges_t):
        if x.dtype in fused_triton.DTYPES:  # pval updated in place
            ge, amax, bad = fused_triton.reduce(x, pval, edges_t)
            return ge, amax, bad, pabs, pval
        # a dtype the kernel does not take (float64): the reference
        ge, amax, bad, _, pval = dense_reduce(x, pval.abs(), pval, edges_t)
        return ge, amax, bad, pabs, pval

    def counts(self, pabs, pval, edges_t):
        if pval.dtype in fused_triton.DTYPES:  # one pass over the signed buffer
            return counts_to_host(fused_triton.counts(pval, edges_t))
        return counts_to_host(position_counts(pabs, edges_t))


BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (Dense, Compiled, Sparse, FusedCpu, Triton)}


def combined(buffers: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The devices' position buffers as one (layers sit on devices in model order: a later device's
    larger |x| wins); where only pval is kept, |pval| is the largest |x|."""
    pabs = pval = None
    for dev_abs, dev_val in buffers.values():
        dev_abs = dev_val.abs() if dev_abs is None else dev_abs
        if pabs is None or pval is None:
            pabs, pval = dev_abs, dev_val
            continue
        other_abs, other_val = dev_abs.to(pabs.device), dev_val.to(pabs.device)
        wins = other_abs > pabs
        pabs, pval = torch.where(wins, other_abs, pabs), torch.where(wins, other_val, pval)
    assert pabs is not None and pval is not None
    return pabs, pval


def dense_top(pabs: torch.Tensor, pval: torch.Tensor, edges_t: torch.Tensor, k_wanted: int) -> np.ndarray:
    """top_values [k, D] on the device (topk of the example order key), one host copy; NaN below the
    lowest edge and past the batch's positions."""
    d = pval.shape[1]
    k = min(k_wanted, pabs.shape[0])
    values, indices = top_positions(example_order_key(pabs, pval, edges_t), k)
    top = pval.gather(0, indices).float()  # below the lowest edge (key 0): NaN
    host = to_host(torch.where(values > 0, top, torch.full_like(top, float("nan"))))
    if k < k_wanted:
        host = np.concatenate([host, np.full((k_wanted - k, d), np.nan, np.float32)])
    return host
