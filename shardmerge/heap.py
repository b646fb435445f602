"""glibc malloc settings for the pass engine's short-lived chunk temporaries.

A method's combine makes dozens of chunk-sized temporaries per chunk (1 Mi elements: 2-4 MB
each). glibc may serve blocks that large with a fresh ``mmap`` and unmap them on ``free``, or
trim them off the top of a thread's heap, so that every new temporary faults its pages in
again. Whether it does depends on how its adaptive thresholds happened to move early in the run:
whole TIES merges of the medium family took either ~0.3 M minor page faults and ~2 s of system
time, or ~4.8 M and ~10.4 s (19-20 s wall instead of 11-12 s), from one run to the next.
:func:`keep_temporaries` fixes the thresholds instead: blocks up to 32 MB (eight times a
float32 chunk) come from the heap, and up to 128 MB of freed memory stays with it for the next
chunk. What it keeps is memory the merge used anyway: peak RSS grew by 10-40 MB on the medium
family (task_arithmetic 0.33 -> 0.37 GB, ties 0.39 -> 0.40 GB).

It also puts every thread's allocations in one arena (``M_ARENA_MAX`` 1). glibc gives each new
thread that allocates its own arena, and each arena keeps up to the trim threshold of freed
memory: with two compute threads a TIES merge of four models with a 1 GB embedding peaked at
0.87 GB, against 0.58 GB sharing one arena (the temporaries one thread frees are the other's
next ones). The engine's threads make few, large allocations, so they hardly contend for it.

glibc only (Linux but Alpine); elsewhere, and where ``mallopt`` refuses, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["keep_temporaries", "outside_heap"]

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024
ARENAS = 1

_applied: bool | None = None


def keep_temporaries() -> bool:
    """Apply the settings once per process; whether malloc took them."""
    global _applied
    if _applied is None:
        _applied = (
            _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
            and _mallopt(_M_ARENA_MAX, ARENAS)
        )
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(param, value))


def outside_heap(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``count`` elements of ``dtype`` that outlive many chunks (a tensor's kept masks, block
    sums or counters), in memory of their own on a CPU: an anonymous mapping, whose pages count
    once written and which goes back whole when freed. Kept on malloc's heap, small blocks that
    outlive the chunk temporaries made between them pin the temporaries' freed memory: 8 KiB
    of counters kept per 1 Mi-element chunk grew a TIES merge of a 1 GB embedding by ~2 MB
    per chunk."""
    import torch

    if device.type != "cpu":
        return torch.empty(count, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(count, 1) * itemsize), dtype=dtype)[:count]
