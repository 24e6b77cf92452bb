"""How the C allocator treats freed memory: kept inside the process for workers that allocate
the same large arrays over and over (the analysis allocates a few hundred MB per site, site after
site), or handed back at once while a model is loaded and partitioned (:func:`return_freed_memory`).

glibc hands every allocation above 32 MB to the kernel with its own ``mmap`` and returns it
with ``munmap`` when freed. On some virtual machines pages handed back are reclaimed by the
host within seconds, and faulting them in again costs about 2 s per GB (measured on the
project's CI machine: 0.26 s for a fresh 118 MB array, 0.004 s for one reusing freed memory).
With ``mmap`` disabled and the heap never trimmed, freed arrays stay in the process and the next
site reuses them. The price is that the process keeps its high-water mark of memory until it
exits, which is what a long analysis worker does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process; returns whether it was applied.

    A no-op (False) off Linux or with another C library. Applies once per process.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # both return 1 on success; the trim threshold is the largest an int allows (2 GB)
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def retaining() -> bool:
    """Whether this process keeps freed memory (:func:`retain_freed_memory` took effect): then an
    array freed early lends its already-touched pages to the next allocations, which a buffer
    kept for later cannot do."""
    return _applied


_M_MMAP_THRESHOLD = -3
# glibc's own ceiling for its sliding mmap threshold on 64-bit systems
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


@contextmanager
def return_freed_memory(threshold_bytes: int = 2**17) -> Iterator[None]:
    """Hand freed blocks above ``threshold_bytes`` back to the kernel at once, for a stage that
    runs a model partitioned by ZeRO-3.

    Under ZeRO-3 each module's full weights are created (or gathered) and freed again, module
    after module, when the model loads and in every forward and backward pass. glibc raises its
    mmap threshold each time a large block is freed (up to 32 MB), so the next full copies land on
    the heap, and freed heap memory stays in the process. Measured on 2 CPU ranks with a 760 MB
    float32 model (``benchmarks/bench_memory.py``): each rank's anonymous memory reached 1.0-1.2
    GB in extraction, more than the whole model, of which ``malloc_trim`` handed back 420 MB after
    one forward pass: garbage, not tensors. With a fixed 128 KB threshold extraction peaked at the
    rank's 380 MB share plus 70-90 MB, and LoRA training at 1.0 GB instead of 1.24 GB (training
    also keeps activations for the backward pass; with 1 MB the many sub-MB activations still
    fragmented the heap). Blocks above the threshold are then mapped afresh each time (page
    faults: LoRA training on CPU ran 1.3x longer); on a GPU the weights and activations live on
    the device and the host allocates little. On exit the threshold is set to glibc's usual
    ceiling and the heap is trimmed. A no-op off glibc, and in a process that keeps freed memory
    on purpose (:func:`retain_freed_memory`).
    """
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


def _libc() -> Any:
    if not sys.platform.startswith("linux") or _applied:
        return None  # a process that keeps freed memory on purpose is left as it is
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
