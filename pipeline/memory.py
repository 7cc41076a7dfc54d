"""Hand freed heap memory back to the OS.

glibc keeps memory that Python and torch free in the process's heap for reuse; after training steps or a
weight reload, gigabytes of it stay resident. On a machine where a trainer and vLLM engines share the RAM
(the online DPO stage on a 24 GiB CPU box), that is the difference between fitting and Ray's OOM killer.
"""

from __future__ import annotations

import ctypes
import gc


def release_freed_memory() -> None:
    """Collect garbage, then ``malloc_trim(0)`` (a no-op where libc is not glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
