"""Where a merge's time goes: run the CLI in this process with wall-clock counters around the
reader (``ShardReader.read_into``), the writer (``OutputFile.append`` and the ``os.pwrite`` under
it) and the method's ``reduce`` (its statistics passes) and ``combine``, then print their totals
and call counts.

    .venv/bin/python benchmarks/phase_times.py run benchmarks/.data/medium/family/task_arithmetic.yml \
        --out /tmp/out --quiet --overwrite

Counters add up across threads (two compute threads' ``combine`` give twice the wall time they
overlap), and a call's time includes its waits for the GIL after a blocking call returns. Compare
a total with the run's wall time: a thread whose total is close to it is the one to speed up.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from shardmerge import shardio

totals: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def timed(key: str, real: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            with _lock:
                totals[key] += time.perf_counter() - start
                calls[key] += 1

    return wrapper


def _merge_classes() -> list[type]:
    """The classes of shardmerge.methods that combine chunks (one per method or family)."""
    import importlib
    import inspect
    import pkgutil

    import shardmerge.methods

    found = []
    for info in pkgutil.iter_modules(shardmerge.methods.__path__):
        module = importlib.import_module(f"shardmerge.methods.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "combine" in cls.__dict__:
                found.append(cls)
    return found


def main(argv: list[str]) -> int:
    shardio.ShardReader.read_into = timed("read_into", shardio.ShardReader.read_into)  # type: ignore[method-assign]
    shardio.OutputFile.append = timed("append", shardio.OutputFile.append)  # type: ignore[method-assign]
    shardio.os.pwrite = timed("pwrite", os.pwrite)  # type: ignore[attr-defined]
    for cls in _merge_classes():  # every method's per-tensor class: its passes and combine
        cls.combine = timed("combine", cls.combine)  # type: ignore[attr-defined]
        if "reduce" in cls.__dict__:
            cls.reduce = timed("reduce", cls.reduce)  # type: ignore[attr-defined]
    from shardmerge.cli import main as cli_main

    began = time.perf_counter()
    code = cli_main(argv)
    wall = time.perf_counter() - began
    print(f"wall {wall:.2f} s (from the CLI's main; start-up before it not counted)")
    for key, total in sorted(totals.items()):
        print(f"  {key}: {total:.2f} s in {calls[key]} calls")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
