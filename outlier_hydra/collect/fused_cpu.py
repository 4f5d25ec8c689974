"""The one-pass CPU reduction (fused_cpu.cpp): built on first use with the machine's C++ compiler.

torch.utils.cpp_extension compiles the file (about 15 s, once) into a cache directory keyed by the
source, the torch version and the CPU's instruction sets (it is built for the CPU it runs on, so a
cluster whose nodes differ gets one build per kind of node). Concurrent builds wait for each other;
a build killed midway leaves nothing that blocks the next.
Where it cannot be built (no compiler, no headers), :func:`available` says why once and the collector
uses the sparse reduction instead: the statistics are the same, only slower.

The cache lives in ``$OUTLIER_HYDRA_CACHE`` (default ``~/.cache/outlier_hydra``)/fused_cpu/.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path

import torch

from outlier_hydra.config.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_cpu.cpp")
_NAMESPACE = "outlier_hydra_fused_cpu"


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's instruction sets as Linux lists them ("flags" on x86, "Features" on ARM)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


# Compiler flags, best first: for this CPU's instruction sets (AVX-512 where it has them) and
# PyTorch's threads (at::parallel_for splits work only in code compiled with OpenMP, PyTorch's CPU
# backend; libgomp.so.1 then resolves to the copy torch has already loaded); else portable and
# single-threaded, for a compiler without those (Apple's clang has no -fopenmp).
FLAGS = (("-O3", "-march=native", "-fopenmp"), ("-O3",))


def build_directory(flags: tuple[str, ...] = FLAGS[0]) -> Path:
    root = cache_dir()
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), torch.__version__, platform.machine(), _cpu_flags(), *flags]).encode()
    ).hexdigest()[:16]
    return root / "fused_cpu" / key


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Build (or find) and load the kernel once per process; False, with one warning, where it cannot."""
    if hasattr(torch.ops, _NAMESPACE) and hasattr(getattr(torch.ops, _NAMESPACE), "reduce"):
        return True
    reasons = []
    for flags in FLAGS:
        try:
            _build(flags)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure to build: the next flags, then sparse
            lines = str(exc).strip().splitlines()
            reasons.append(lines[-1] if lines else type(exc).__name__)
    log.warning("the one-pass CPU reduction could not be built (%s); using the sparse reduction", reasons[-1])
    return False


BUILD_WAIT_S = 600.0  # how long to wait for another process's build before giving up on it


def _build(flags: tuple[str, ...]) -> None:
    """Build or load under this project's lock (outlier_hydra/lock.py: a dead holder's lock is taken
    over), not only torch's: torch's own lock file, left by a build that was killed, makes every
    later load wait forever, so the holder of ours removes it first."""
    from torch.utils.cpp_extension import load

    from outlier_hydra.errors import OutlierHydraError
    from outlier_hydra.lock import RunLock

    directory = build_directory(flags)
    directory.mkdir(parents=True, exist_ok=True)
    lock, deadline = RunLock(directory), time.monotonic() + BUILD_WAIT_S
    while True:
        try:
            lock.acquire()
            break
        except OutlierHydraError:  # another live process is building it: wait for it
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    try:
        (directory / "lock").unlink(missing_ok=True)  # torch's, from a build killed midway
        if not any(directory.glob("outlier_hydra_fused_cpu*.so")):  # (torch names a rebuild *_v1.so)
            log.info("building the one-pass CPU reduction in %s (once per machine type, about 15 s)", directory)
        load(
            name="outlier_hydra_fused_cpu",
            sources=[str(SOURCE)],
            build_directory=str(directory),
            extra_cflags=list(flags),
            extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            is_python_module=False,
            verbose=False,
        )
    finally:
        lock.release()


def reduce(x: torch.Tensor, pval: torch.Tensor, edges_t: torch.Tensor):
    """x [N, D] -> (ge [D, E] int64, amax [D] float32, nonfinite [] int64); pval updated in place."""
    return getattr(torch.ops, _NAMESPACE).reduce(x, pval, edges_t)


def positions(pval: torch.Tensor, edges_t: torch.Tensor, k: int):
    """pos_ge_counts [D, E] and top_values [k, D] (NaN-filled) of the batch's position buffer."""
    pos_ge, top = getattr(torch.ops, _NAMESPACE).positions(pval, edges_t, k)
    return pos_ge.numpy(), top.numpy()


def row_absmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| per row of t [S, C] as float32, -1 where the row holds a NaN (one read of t)."""
    return getattr(torch.ops, _NAMESPACE).row_absmax(t)


def hits(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The flat indices of x [N, D] where |x| >= threshold as float32 holds it, in order."""
    return getattr(torch.ops, _NAMESPACE).hits(x, threshold)


def segment_max(values: torch.Tensor, segment: torch.Tensor, token: torch.Tensor, n: int):
    """Per segment the largest value >= 0 and its row (equal values: the smallest token, then the
    last row; -1 and -1 where none): (best [n] float32, row [n] int64)."""
    return getattr(torch.ops, _NAMESPACE).segment_max(values, segment, token, n)


def routing(logits: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None, hits: torch.Tensor, d: int):
    """The router stage's sums for one pass of one layer, float64 [E + 2 + (E + 3) * d]: choices per
    expert, entropy sum, top-1 share sum, then [choices per expert | entropy | share | 1] summed over
    the outlier positions (flat hits into [N, d]) per dim (see fused_cpu.cpp)."""
    return getattr(torch.ops, _NAMESPACE).routing(logits, idx, weights, hits, d)
