"""Crash points for the kill-and-resume tests.

``SHARDMERGE_KILL_AT=<point>:<n>`` makes the process SIGKILL itself the n-th time it reaches
``<point>`` (``chunk-written``, ``shard-done``, ``before-index``), so tests can interrupt a run at
an exact place instead of racing a timer. Unset, each call is one dictionary lookup.
``SHARDMERGE_KILL_RANK=<r>`` restricts it to the process whose RANK is r (distributed runs).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_ENV = "SHARDMERGE_KILL_AT"
_seen: Counter[str] = Counter()


def reached(point: str) -> None:
    spec = os.environ.get(_ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    rank = os.environ.get("SHARDMERGE_KILL_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _seen[point] += 1
    if _seen[point] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
