"""Freed host memory kept for reuse on a CPU run (glibc's malloc; elsewhere nothing is changed).

A forward pass on the CPU allocates and frees the same few hundred MB of activations every time. With
glibc's defaults each large block is handed back to the operating system when freed (blocks above the
mmap threshold, and the top of the heap above the trim threshold), so the next pass takes it back
page by page: on `benchmark=cpu_mid` tens of thousands of page faults per forward, each a zeroed
4 KiB page, and how many depended on what ran before (glibc moves the mmap threshold as blocks are
freed), so a bare forward was slower after a collection than after a forward. With blocks up to 32 MiB
served from the heap and up to 1 GiB of freed heap kept, there are no page faults after the first
pass, the forward takes the same time whatever ran before, and a collection's cost is its own
(docs/performance.md). The price: up to 1 GiB of freed memory stays with the process instead of going back to
the OS (peak RSS, what a scheduler limits, is unchanged).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
KEEP = 2**30


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Set glibc's thresholds once per process; True where they were set (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; musl's is a stub returning 0
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP) == 1
    if done:
        log.debug(
            "host memory: blocks up to %d MiB from the heap, up to %d MiB of it kept", MMAP_THRESHOLD >> 20, KEEP >> 20
        )
    return done
