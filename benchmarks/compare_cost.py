"""What ``shardmerge compare`` costs past start-up: its arithmetic alone, then whole runs in one
process (torch imported once), with one or two compute threads, side by side.

    .venv/bin/python benchmarks/compare_cost.py                      # arithmetic only
    .venv/bin/python benchmarks/compare_cost.py A B [--base BASE] --rounds 4

Arithmetic: ``similarity.accumulate`` on one bf16 chunk of compare's size (B 0.002 from A, the
base 0.001 from A), one torch thread, best and median CPU milliseconds of ``--repeats``. Runs:
``compare_models`` on the given folders, alternating 1 and 2 compute threads (``CPU_WORKERS``)
``--rounds`` times after an untimed run, wall and CPU (user + sys, every thread) seconds of each.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from shardmerge import compare, similarity


def arithmetic_ms(with_base: bool, repeats: int) -> tuple[float, float]:
    """(best, median) CPU ms of ``accumulate`` on one chunk."""
    g = torch.Generator().manual_seed(0)
    numel = compare.CHUNK_NUMEL
    a32 = 0.02 * torch.randn(numel, generator=g)
    a = a32.bfloat16()
    b = (a32 + 0.002 * torch.randn(numel, generator=g)).bfloat16()
    base = (a32 + 0.001 * torch.randn(numel, generator=g)).bfloat16() if with_base else None
    scratch = similarity.scratch_buffer(similarity.SUB_NUMEL)
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.process_time()
        similarity.accumulate(similarity.Sums(), a, b, base, scratch)
        times.append(1e3 * (time.process_time() - start))
    return min(times[1:]), statistics.median(times[1:])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="two model folders (runs); none: arithmetic")
    parser.add_argument("--base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not args.models:
        torch.set_num_threads(1)
        for with_base in (False, True):
            best, median = arithmetic_ms(with_base, args.repeats)
            label = "with a base" if with_base else "no base"
            print(f"accumulate, {compare.CHUNK_NUMEL:,} elements, {label}: ", end="")
            print(f"best {best:.2f} ms, median {median:.2f} ms CPU")
        return
    if len(args.models) != 2:
        parser.error("two model folders, or none")
    refs = [*args.models, *([args.base] if args.base else [])]
    compare.compare_models(refs, device="cpu")  # warm-up: the first run imports and allocates
    for _ in range(args.rounds):
        for workers in (1, 2):
            compare.CPU_WORKERS = workers
            wall, cpu = time.perf_counter(), cpu_seconds()
            compare.compare_models(refs, device="cpu")
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            print(f"compute threads {workers}: wall {wall:.2f} s, CPU {cpu:.2f} s", flush=True)


if __name__ == "__main__":
    main()
