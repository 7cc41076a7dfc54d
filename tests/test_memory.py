"""The heap policy around training (pipeline/memory.py), read from glibc's own counters (mallinfo2)."""

from __future__ import annotations

import ctypes

import torch

from pipeline.memory import large_buffers_on_heap

MB64 = 64 * 2**20 // 4  # float32 elements in 64 MB: above glibc's largest mmap threshold (32 MB)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().hblkhd  # bytes glibc holds in mmapped blocks


def _mmapped_by_a_buffer() -> int:
    before = _mmapped_bytes()
    buf = torch.ones(MB64)
    grown = _mmapped_bytes() - before
    del buf
    return grown


def test_large_buffers_come_from_the_heap_inside_the_block_only():
    # Outside: glibc serves a 64 MB buffer with its own mmap (unmapped again on free).
    assert _mmapped_by_a_buffer() >= 64 * 2**20
    with large_buffers_on_heap():
        # Inside: from the heap, which is not trimmed while the block lasts (measured effect: see the function).
        assert _mmapped_by_a_buffer() == 0
    # After the block the defaults are back.
    assert _mmapped_by_a_buffer() >= 64 * 2**20
