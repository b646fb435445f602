"""Run a command; write its wall time, peak RSS and exit status as JSON.

    python benchmarks/measure.py RESULT.json -- COMMAND ...

A stand-in for `/usr/bin/time -v` where it is missing (the GPU machine). It must be a process of
its own, started fresh: a child forked from a process that has imported torch would carry the
parent's resident pages until it execs, and the kernel counts them in the child's peak RSS
(`dd` showed 0.26 GB). This small interpreter's pages are what any fork from it carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print("usage: measure.py RESULT.json -- COMMAND ...", file=sys.stderr)
        return 2
    result, command = sys.argv[1], sys.argv[3:]
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as fh:
        # ru_maxrss: KiB on Linux; the largest of the child and its waited-for descendants.
        json.dump({"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "exit": code}, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())
