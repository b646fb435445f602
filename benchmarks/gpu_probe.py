"""Run one `shardmerge` command in this process and record what only the process can see.

    python benchmarks/gpu_probe.py --stats S.json [--profile P.json] -- run RECIPE --out DIR ...

`--stats` writes the peak GPU memory (`torch.cuda.max_memory_allocated` / `_reserved`) once the
command is done. `--profile` also times where the merge goes: busy seconds of the engine's
reads, computes and writes (host clocks around the engine's own functions, summed over the
threads that run them), and on CUDA the device's H2D copies, kernels and D2H copies from
torch.profiler, with how much of the copies overlapped the kernels. The timers change the
timing a little, so gpu_check.py runs the profile separately from the timed runs.

The command is shardmerge's CLI (`shardmerge.cli.main`), run and exited as the `shardmerge` binary
does (`shardmerge.cli.entry`), with the stats written just before the exit.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import gzip
import json
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The engine functions timed in --profile, by the role they play: (module of shardmerge, class
# or None for a function of the module, name).
PROFILED = {
    "read": ("shardio", "ShardReader", "read_into"),  # preadv of input chunks into the slots
    "compute": ("engine", None, "_compute"),  # one step's math: H2D, sums or combine, D2H
    "write": ("shardio", "ShardFile", "write"),  # output chunks to the disk (O_DIRECT or staged)
    "merge": ("engine", None, "execute_plan"),  # the whole engine run
}


class HostTimers:
    """Busy seconds per role, summed over threads, and the threads that did the work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.threads: dict[str, set[str]] = defaultdict(set)

    def wrap(self, role: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                with self._lock:
                    self.seconds[role] += elapsed
                    self.calls[role] += 1
                    self.threads[role].add(threading.current_thread().name)

        return timed

    def install(self) -> None:
        """Wrap the engine's functions (imported here, so torch is imported now)."""
        import importlib

        for role, (module_name, owner, name) in PROFILED.items():
            module = importlib.import_module(f"shardmerge.{module_name}")
            target = module if owner is None else getattr(module, owner)
            setattr(target, name, self.wrap(role, getattr(target, name)))

    def summary(self) -> dict[str, Any]:
        wall = self.seconds.get("merge", 0.0)
        roles = {}
        for role in PROFILED:
            if role == "merge":
                continue
            busy = self.seconds.get(role, 0.0)
            roles[role] = {
                "busy_s": round(busy, 3),
                "calls": self.calls.get(role, 0),
                "threads": sorted(self.threads.get(role, ())),
                # Above 1 for a role shared by several threads (the two compute threads).
                "busy_per_merge_s": round(busy / wall, 3) if wall else None,
            }
        return {"merge_wall_s": round(wall, 3), "roles": roles}


def _merge_intervals(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted, disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def device_category(name: str) -> str:
    """What a device event is: h2d, d2h, d2d, memset or kernel (from the CUDA trace's name)."""
    lowered = name.lower()
    if "memcpy" in lowered:
        if "htod" in lowered:
            return "h2d"
        if "dtoh" in lowered:
            return "d2h"
        return "d2d"
    if "memset" in lowered:
        return "memset"
    return "kernel"


def device_summary(events: list[tuple[str, float, float]], wall_us: float) -> dict[str, Any]:
    """Summarise device events (name, start µs, end µs): time per category, the union of busy
    time, and how much of the copies ran while a kernel ran (copy/compute overlap)."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, start, end in events:
        spans[device_category(name)].append((start, end))
    merged = {cat: _merge_intervals(s) for cat, s in spans.items()}
    every = _merge_intervals([span for s in spans.values() for span in s])
    kernels = merged.get("kernel", [])
    out: dict[str, Any] = {"wall_ms": round(wall_us / 1e3, 1)}
    for cat in ("h2d", "kernel", "d2h", "d2d", "memset"):
        if cat not in spans:
            continue
        out[cat] = {
            "count": len(spans[cat]),
            "sum_ms": round(sum(e - s for s, e in spans[cat]) / 1e3, 1),
            "busy_ms": round(_length(merged[cat]) / 1e3, 1),
        }
        if cat in ("h2d", "d2h") and kernels:
            out[cat]["overlapping_kernels_ms"] = round(_intersection(merged[cat], kernels) / 1e3, 1)
    busy = _length(every)
    out["device_busy_ms"] = round(busy / 1e3, 1)
    if every:
        first, last = every[0][0], every[-1][1]
        out["first_to_last_ms"] = round((last - first) / 1e3, 1)
        out["device_busy_fraction_of_that"] = round(busy / max(last - first, 1e-9), 3)
    return out


@contextmanager
def cuda_trace(enabled: bool, trace_path: Path | None) -> Iterator[list[tuple[str, float, float]]]:
    """Record the device's copies and kernels with torch.profiler while the block runs."""
    events: list[tuple[str, float, float]] = []
    if not enabled:
        yield events
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield events
    torch.cuda.synchronize()
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        events.append((evt.name, float(evt.time_range.start), float(evt.time_range.end)))
    if trace_path is not None:
        raw = trace_path.with_suffix(".tmp.json")
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(trace_path, "wb") as dst:
            dst.write(src.read())
        raw.unlink()


# The pipeline's phases, timed in every run (plain wrappers, no cost worth naming): where the
# seconds outside the engine go (torch's import, CUDA's start, the output's metadata).
PHASES = ("import_torch", "prepare", "merge_shards", "finish_output", "resolve_device")


def install_phase_timers(seconds: dict[str, float]) -> None:
    from shardmerge import pipeline

    active: list[str] = []  # the phases running now, outermost first

    for name in PHASES:
        fn = getattr(pipeline, name)

        def timed(*args: Any, _fn: Callable[..., Any] = fn, _name: str = name, **kw: Any) -> Any:
            start = time.perf_counter()
            outer = active[:]
            active.append(_name)
            try:
                return _fn(*args, **kw)
            finally:
                active.pop()
                took = time.perf_counter() - start
                seconds[_name] = seconds.get(_name, 0.0) + took
                # torch's import inside merge_shards (the CPU path) is not the merge's own time;
                # on CUDA, resolve_device imports it before merge_shards starts.
                if _name == "import_torch" and "merge_shards" in outer:
                    seconds["import_torch_in_merge"] = (
                        seconds.get("import_torch_in_merge", 0.0) + took
                    )

        setattr(pipeline, name, timed)
    real_import = pipeline.import_torch

    def import_then_time_cuda_start(*args: Any, **kw: Any) -> Any:
        # Once torch is in, the engine can be imported too (the merge imports it next anyway):
        # time its first CUDA call, the slots' registration, which creates the CUDA context.
        torch = real_import(*args, **kw)
        from shardmerge import engine

        register = engine._register_pinned
        if not getattr(register, "_timed", False):

            def timed_register(pool: Any) -> Any:
                start = time.perf_counter()
                try:
                    return register(pool)
                finally:
                    seconds["cuda_start"] = time.perf_counter() - start

            timed_register._timed = True  # type: ignore[attr-defined]
            engine._register_pinned = timed_register
        return torch

    pipeline.import_torch = import_then_time_cuda_start


def _memory_status() -> dict[str, int]:
    """Peak and current resident memory by kind (Linux): anonymous memory is ours; file pages
    are mostly shared libraries (torch's CUDA libraries are several hundred MB of them)."""
    fields = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def _gpu_memory() -> dict[str, int] | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {
        "max_memory_allocated": int(torch.cuda.max_memory_allocated()),
        "max_memory_reserved": int(torch.cuda.max_memory_reserved()),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(
            "usage: gpu_probe.py --stats FILE [--profile FILE] -- SHARDMERGE ARGS", file=sys.stderr
        )
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--trace", type=Path, help="with --profile on CUDA: a gzipped Chrome trace")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]

    from shardmerge import cli

    phases: dict[str, float] = {}
    install_phase_timers(phases)
    timers = HostTimers() if args.profile else None
    on_cuda = False
    if timers is not None:
        timers.install()
        import torch

        on_cuda = torch.cuda.is_available() and "cpu" not in _device_arg(command)
    start = time.perf_counter()
    with cuda_trace(on_cuda, args.trace) as events:
        code = cli.main(command)
    wall = time.perf_counter() - start
    stats: dict[str, Any] = {"exit_code": code, "wall_in_process_s": round(wall, 3)}
    stats["gpu_memory"] = _gpu_memory()
    stats["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
    stats["memory"] = _memory_status()
    args.stats.write_text(json.dumps(stats, indent=2))
    if timers is not None and args.profile is not None:
        profile: dict[str, Any] = {"host": timers.summary(), "device": None}
        if on_cuda:
            merge_us = timers.seconds.get("merge", 0.0) * 1e6
            profile["device"] = device_summary(events, merge_us)
        args.profile.write_text(json.dumps(profile, indent=2))
    return code


def _device_arg(command: list[str]) -> str:
    if "--device" in command:
        index = command.index("--device")
        if index + 1 < len(command):
            return command[index + 1]
    return "auto"


def _exit(code: int) -> None:
    """Exit as the `shardmerge` binary does (shardmerge.cli.entry): once torch is loaded, the
    atexit handlers, flushed streams, then os._exit, skipping the interpreter's module teardown
    (0.45 s), so the timed runs time what users run."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if "torch" not in sys.modules or run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
