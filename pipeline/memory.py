"""Heap policy around training: keep large buffers while training, hand freed memory back to the OS after.

glibc keeps memory that Python and torch free in the process's heap for reuse; after training steps or a
weight reload, gigabytes of it stay resident. On a machine where a trainer and vLLM engines share the RAM
(the online DPO stage on a 24 GiB CPU box), that is the difference between fitting and Ray's OOM killer.
During training the opposite is wanted: see ``large_buffers_on_heap``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist only in glibc)
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collect garbage, then ``malloc_trim(0)`` (a no-op where libc is not glibc)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def large_buffers_on_heap(keep_freed: bool = False) -> Iterator[None]:
    """Inside the block, large allocations come from the heap and freed memory stays there for the next step.

    glibc serves every large allocation (a batch's logits, the embedding gradient, the MoE expert buffers)
    with a fresh ``mmap`` and unmaps it on free, so each training step page-faults and zeroes those gigabytes
    again; inside the block they come from the heap and are reused (the README's Performance section has the
    measured effect). jemalloc or tcmalloc would do the same, but need LD_PRELOAD before the process starts.
    On exit the defaults come back and the freed heap is returned to the OS. A no-op where libc is not glibc.

    ``keep_freed``: on exit only large allocations go back to ``mmap``; the heap keeps what was freed in
    the block for the next one (for a block that runs again and again, such as a weight sync into a CPU
    engine, which replaces its prepacked GEMM buffers each time).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # mallopt takes a C int
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        if not keep_freed:
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            release_freed_memory()
