"""The heap policy around training (pipeline/memory.py), read from the process's own page-fault counter."""

from __future__ import annotations

import resource

import torch

from pipeline.memory import large_buffers_on_heap

MB64 = 64 * 2**20 // 4  # float32 elements in 64 MB: above glibc's largest mmap threshold (32 MB)


def _faults_of_second_buffer() -> int:
    """Page faults of filling a fresh 64 MB tensor right after an identical one was freed."""
    first = torch.ones(MB64)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(MB64)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults


def test_large_buffers_are_reused_inside_the_block_and_not_outside():
    pages = 64 * 2**20 // resource.getpagesize()
    # Outside: glibc mmaps the buffer and unmaps it on free, so the second one faults in every page again.
    assert _faults_of_second_buffer() > pages // 2
    with large_buffers_on_heap():
        _faults_of_second_buffer()  # grows the heap once
        # Inside: the freed 64 MB stays in the heap and the next buffer reuses it, already mapped.
        assert _faults_of_second_buffer() < pages // 10
    # After the block the defaults are back.
    assert _faults_of_second_buffer() > pages // 2
