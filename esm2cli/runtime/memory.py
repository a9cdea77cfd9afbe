"""Host memory: bounded kernel caches on the CPU, and freed memory handed back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

# oneDNN (its primitive cache) and PyTorch's ideep (its LRU cache of matmul and linear descriptors) each
# keep up to 1,024 compiled kernels, one per shape; with bf16 on the CPU these held ~1 GB on 32,000
# proteins. Width buckets (esm2cli.runtime.batching) bring a run down to a few dozen shapes an operator,
# so 64 entries each keep what a run reuses and bound the rest. Both libraries read these variables once,
# on their first kernel, not at import: setting them before the first forward is enough. 0 is not "off":
# ideep crashed (segfault) with LRU_CACHE_CAPACITY=0, so a bound is never below 1.
KERNEL_CACHE_ENTRIES = 64
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> dict[str, str]:
    """Caps the CPU kernel caches at ``entries`` each, unless the user set them in the environment.

    Call before the first forward of the process (build_engine does); later calls change nothing.

    Returns:
        The variables as they now are.
    """
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(max(1, entries)))
    return {name: os.environ[name] for name in KERNEL_CACHE_VARIABLES}


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Asks the C allocator to hand memory freed by the process back to the system.

    glibc keeps freed blocks in its arenas (one per thread that allocated), so that a run's resident size
    stays at its high-water mark after a chunk's rows are written and dropped; malloc_trim returns the
    free pages. Cheap (milliseconds) once a chunk.

    Returns:
        True when memory was returned, False when none was or the C library has no malloc_trim.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
