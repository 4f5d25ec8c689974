"""Device-to-host copies at the end of a batch (the one place a collection waits for the GPU)."""

from __future__ import annotations

import numpy as np
import torch


def to_host(t: torch.Tensor) -> np.ndarray:
    """t as a numpy array. From a CUDA device through page-locked memory, which copies several times
    faster than pageable memory (torch keeps freed page-locked blocks for the next batch); the array
    keeps its block alive for as long as it lives. On the CPU: t itself, no copy."""
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type != "cuda":  # other accelerators: a plain copy
        return t.cpu().numpy()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out.numpy()


def counts_to_host(t: torch.Tensor) -> np.ndarray:
    """Per-token counts of one batch (each at most its number of tokens, far below 2**31) as int64,
    sent from a GPU as int32: half the bytes over the bus (on the CPU no bus: no narrowing)."""
    if t.device.type == "cpu":
        return t.numpy().astype(np.int64, copy=False)
    return to_host(t.to(torch.int32)).astype(np.int64)
