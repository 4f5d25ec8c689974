"""The per-tensor reductions in torch ops (the backends of backends.py use them; the one-pass ones are
fused_cpu.cpp for the CPU and fused_triton_kernel.py for CUDA), with identical statistics.

For a hooked tensor x [N, D] with a = |x| (NaN/Inf counted, then treated as 0):
  ge[d, e] = #(a[:, d] >= edges[e])     amax[d] = max a[:, d]     nonfinite = #(NaN, Inf)
and the per-position buffers pabs/pval [N, D] keep, over the modules so far, the largest |x| and
its signed value (ties keep the earlier).
  dense     plain PyTorch, no host sync inside a hook: the reference
  compiled  torch.compile of the dense reduction, fused into one kernel per tensor (GPU default)
  sparse    only the values >= the lowest edge (a few percent) are binned and scattered into the
            position buffer; it asks the host how many there are, which is free on a CPU
  fused     one pass in C++ over each tensor (fused_cpu.cpp, built on first use; CPU default where it
            builds, else sparse): the maxima and the values >= the lowest edge, nothing else
  triton    one pass in Triton over each tensor (fused_triton.py; CUDA default where triton imports,
            else compiled): one read of x and of the position buffer, two launches, no host sync
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def dense_reduce(x: torch.Tensor, pabs: torch.Tensor, pval: torch.Tensor, edges_t: torch.Tensor):
    """x [N, D] -> (ge [D, E] int64, amax [D], nonfinite [], new pabs, new pval). No host sync.
    Each edge is compared as a 1-element float32 tensor: a half-precision |x| is promoted to it (a
    0-dim tensor would be rounded to the half type instead: 0.8 to float16's 0.7998)."""
    a = x.abs()
    finite = a < float("inf")  # False for NaN and Inf
    a = torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device))
    ge = torch.stack([(a >= edges_t[i : i + 1]).sum(0) for i in range(edges_t.shape[0])], 1)
    amax = a.amax(0)
    wins = a > pabs
    return ge, amax, (~finite).sum(), torch.where(wins, a, pabs), torch.where(wins, x, pval)


def sparse_reduce(x: torch.Tensor, pabs: torch.Tensor, pval: torch.Tensor, edges_t: torch.Tensor):
    """Same result as dense_reduce (pabs/pval updated in place), touching only values >= edges[0]."""
    n, d = x.shape
    e = edges_t.numel()
    a = x.abs()
    amax = a.amax(0)
    nonfinite = torch.zeros((), dtype=torch.int64, device=x.device)
    if not bool(torch.isfinite(amax).all()):  # host sync: this backend is for the CPU
        finite = a < float("inf")
        nonfinite = (~finite).sum()
        a = torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device))
        amax = a.amax(0)
    rows, cols = (a >= edges_t[:1]).nonzero().unbind(1)
    v = a[rows, cols]
    bins = torch.bucketize(v.float(), edges_t, right=True) - 1
    hist = torch.bincount(cols * e + bins, minlength=d * e).view(d, e)
    ge = hist.flip(1).cumsum(1).flip(1)
    flat = rows * d + cols  # unique within one module
    pabs_flat, pval_flat = pabs.view(-1), pval.view(-1)
    wins = v > pabs_flat[flat]
    flat = flat[wins]
    pabs_flat[flat] = v[wins]
    pval_flat[flat] = x[rows[wins], cols[wins]]
    return ge, amax, nonfinite, pabs, pval


@functools.lru_cache(maxsize=64)
def edges_on(edges: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The histogram edges as a float32 tensor on the device, made once: a copy to a GPU from the
    host waits for the GPU, so no batch should make it again in a hook. Read-only."""
    return torch.tensor(edges, dtype=torch.float32, device=device)


def at_least(t: torch.Tensor, value: float) -> torch.Tensor:
    """t >= value, with value as float32 holds it (as the histogram edges) and t's values exact: a
    1-element float32 tensor promotes a half-precision t, where a Python float would be rounded to
    t's dtype (6.11 to float16's 6.1094)."""
    return t >= edges_on((float(value),), t.device)


_compiled_reduce = None


def compiled_reduce(x, pabs, pval, edges_t):
    global _compiled_reduce
    if _compiled_reduce is None:
        _compiled_reduce = torch.compile(dense_reduce, dynamic=False)
    return _compiled_reduce(x, pabs, pval, edges_t)


def position_counts(pabs: torch.Tensor, edges_t: torch.Tensor) -> torch.Tensor:
    """pos_ge_counts on the device, no host sync (the dense and compiled paths)."""
    return torch.stack([(pabs >= edges_t[i : i + 1]).sum(0) for i in range(edges_t.shape[0])], 1)


def sparse_positions(pabs: torch.Tensor, pval: torch.Tensor, edges_t: torch.Tensor, k: int):
    """pos_ge_counts and top_values from the few positions whose max |x| reaches the lowest edge:
    one host copy of those entries, ordered there (|v| desc, then v desc, as the dense path)."""
    d, e = pabs.shape[1], edges_t.shape[0]
    rows, cols = (pabs >= edges_t[:1]).nonzero().unbind(1)
    mags = pabs[rows, cols].float()
    bins = torch.bucketize(mags, edges_t, right=True) - 1
    pos_ge = torch.bincount(cols * e + bins, minlength=d * e).view(d, e).flip(1).cumsum(1).flip(1).cpu().numpy()
    cols_np, mags_np, vals_np = cols.cpu().numpy(), mags.cpu().numpy(), pval[rows, cols].float().cpu().numpy()
    order = np.lexsort((-vals_np, -mags_np, cols_np))  # by dim, then |v| desc, then v desc
    cols_sorted = cols_np[order]
    starts = np.searchsorted(cols_sorted, np.arange(d))
    rank = np.arange(len(order)) - starts[cols_sorted]
    keep = rank < k
    top = np.full((k, d), np.nan, np.float32)
    top[rank[keep], cols_sorted[keep]] = vals_np[order][keep]
    return pos_ge, top


def example_order_key(pabs: torch.Tensor, pval: torch.Tensor, edges_t: torch.Tensor) -> torch.Tensor:
    """A total order for picking examples: |v| first, then positive before negative, so that equal
    keys mean equal signed values and which position topk picks among them cannot change the result;
    below the lowest edge: 0. For 16-bit values an int32, half float64's bytes: the 15 bits of |v|
    (their order is |v|'s; no NaN is ever kept), then the sign's bit. Else float64: |v|, one ulp up
    if positive (far below the spacing of float32 values)."""
    if pval.dtype in (torch.bfloat16, torch.float16):
        key = ((pval.view(torch.int16).to(torch.int32) & 0x7FFF) << 1) | (pval > 0).to(torch.int32)
    else:
        key = pabs.double()
        key = torch.where(pval > 0, torch.nextafter(key, torch.full_like(key, float("inf"))), key)
    return torch.where(pabs >= edges_t[:1], key, torch.zeros_like(key))


def top_positions(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [k, D] of the k largest keys of each column of key [N, D]. topk runs along
    contiguous rows of the transposed key: across dim 0 it reads every column with a stride of D."""
    best = key.t().contiguous().topk(k, dim=1)
    return best.values.t(), best.indices.t()


def sorted_top(top: np.ndarray) -> np.ndarray:
    """Canonical order (|v| desc, then v desc, NaN last), as merge_top_values keeps it."""
    from outlier_hydra.stats import merge_top_values

    return merge_top_values(top, np.full_like(top, np.nan))


def compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean torch.compile or Triton could not build the kernel (not OOM, not a bug in a hook)."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:  # pragma: no cover - very old torch
        pass
    try:
        from torch._inductor.exc import InductorError  # type: ignore[attr-defined]

        errors.append(InductorError)
    except ImportError:  # pragma: no cover - torch without it
        pass
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        errors += [CompilationError, OutOfResources]
    except ImportError:  # pragma: no cover - no triton
        pass
    return tuple(errors)


def kernel_fallback(who: str, exc: BaseException, instead: str) -> None:
    """Say once that a kernel could not be built (one of compile_errors()) and what runs instead."""
    import logging

    from outlier_hydra.errors import first_line

    logging.getLogger("outlier_hydra.collect").warning(
        "%s could not build its kernel (%s); using %s from now on", who, first_line(exc), instead
    )
