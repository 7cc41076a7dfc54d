"""The heap policy around training (pipeline/memory.py), read from glibc's own counters (mallinfo2)."""

from __future__ import annotations

import ctypes

import torch

from pipeline.memory import large_buffers_on_heap


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _info() -> _Mallinfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2()


def _mmapped_by_a_buffer() -> int:
    """Bytes glibc mmaps for a buffer larger than all free heap memory (so no free chunk can serve it; a
    process that trained before may hold gigabytes of free heap). torch.empty: nothing is touched."""
    size = _info().fordblks + 64 * 2**20
    before = _info().hblkhd  # bytes glibc holds in mmapped blocks
    buf = torch.empty(size, dtype=torch.uint8)
    grown = _info().hblkhd - before
    del buf
    return grown


def test_large_buffers_come_from_the_heap_inside_the_block_only():
    # Outside: glibc serves such a buffer with its own mmap (unmapped again on free).
    assert _mmapped_by_a_buffer() > 0
    with large_buffers_on_heap():
        # Inside: from the heap, which is not trimmed while the block lasts (measured effect: see the function).
        assert _mmapped_by_a_buffer() == 0
    # After the block the defaults are back.
    assert _mmapped_by_a_buffer() > 0
