"""Time a passthrough layer stack (depth up-scaling) against mergekit and a read+write floor.

    .venv/bin/python benchmarks/stack.py --size medium --repeats 3
    .venv/bin/python benchmarks/stack.py --size tiny --tools shardmerge,floor --repeats 1
    .venv/bin/python benchmarks/stack.py --size medium --tools shardmerge,floor --cold   # root

The input is make_pair.py's model A of L layers; the stack is its layers [0, 3L/4) then
[L/4, L) (SOLAR style: 3L/2 layers, the middle half used twice). The floor reads A's files
once and writes the output's size with `dd oflag=direct bs=8M` (run.py's floor_command with
direct=True: O_DIRECT as shardmerge writes, so the write always reaches the disk; a buffered
write was bimodal, 0.6 s when it stayed in the page cache and ~4 s when flushed). Results: a
markdown table on stdout, JSON in DATA_DIR/stack-SIZE.json (stack-SIZE-cold.json). ``--cold``:
the page cache is dropped before every run (run.py's drop_caches: root on Linux) and each run is
timed until its output is on the disk (`sync`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_pair import DATA_DIR, PRESETS, ensure_pair  # noqa: E402
from run import (  # noqa: E402
    DEFAULT_MERGEKIT,
    DEFAULT_SHARDMERGE,
    ToolRuns,
    can_drop_caches,
    floor_command,
    machine_info,
    safetensors_files,
    time_once,
    with_sync,
)


def stack_config(model: Path, num_layers: int) -> str:
    """A mergekit passthrough config (shardmerge runs it unchanged)."""
    first, second = (0, num_layers * 3 // 4), (num_layers // 4, num_layers)
    return (
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - {{model: {model}, layer_range: [{first[0]}, {first[1]}]}}\n"
        f"  - sources:\n      - {{model: {model}, layer_range: [{second[0]}, {second[1]}]}}\n"
        "dtype: bfloat16\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--tools", default="shardmerge,mergekit,floor")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shardmerge-bin", default=str(DEFAULT_SHARDMERGE))
    parser.add_argument("--mergekit-bin", default=str(DEFAULT_MERGEKIT))
    parser.add_argument("--quiet-wait-s", type=float, default=20.0)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    args = parser.parse_args(argv)
    if args.cold and (why := can_drop_caches()) is not None:
        parser.error(why)
    tools = args.tools.split(",")
    spec = PRESETS[args.size]
    work = (DATA_DIR / args.size).resolve()
    ensure_pair(spec, work)
    model = work / "a"
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    stack = work / "stack"
    stack.mkdir(exist_ok=True)
    config = stack / "passthrough.yml"
    config.write_text(stack_config(model, num_layers))
    inputs = safetensors_files(model)
    input_bytes = sum(p.stat().st_size for p in inputs)

    def timed(command: list[str]) -> list[str]:
        return with_sync(command) if args.cold else command

    runs: list[ToolRuns] = []
    if "shardmerge" in tools:
        out = stack / "out-shardmerge-passthrough"  # out_dir below: time_once empties it
        cmd = [args.shardmerge_bin, "run", str(config), "--out", str(out), "--overwrite"]
        runs.append(ToolRuns("shardmerge passthrough", timed([*cmd, "--quiet"])))
    if "mergekit" in tools and Path(args.mergekit_bin).exists():
        out = stack / "out-mergekit-passthrough"
        command = [args.mergekit_bin, str(config), str(out)]
        runs.append(ToolRuns("mergekit passthrough", timed(command)))
    # The floor writes as many bytes as the stack's tensors (measured from a first run).
    out_bytes = 0
    for repeat in range(args.repeats):
        for tool in runs:
            if tool.failed or tool.name == "floor":  # the floor is timed below, once a repeat
                continue
            out_dir = stack / ("out-" + tool.name.replace(" ", "-"))
            log = stack / (tool.name.replace(" ", "-") + f"-{repeat + 1}.log")
            run = time_once(tool, out_dir, log, inputs, args.quiet_wait_s, cold=args.cold)
            if run.returncode != 0:
                tool.failed = f"exit {run.returncode}, log {log}"
                print(f"{tool.name} FAILED: {tool.failed}", file=sys.stderr)
                continue
            tool.walls_s.append(run.wall_s)
            tool.peak_rss_bytes.append(run.peak_rss_bytes)
            tool.others_cpu_s.append(run.others_cpu_s)
            tool.own_cpu_s.append(run.own_cpu_s)
            out_bytes = sum(p.stat().st_size for p in safetensors_files(out_dir)) or out_bytes
            print(
                f"repeat {repeat + 1} {tool.name}: {run.wall_s:.2f} s, user+sys "
                f"{run.own_cpu_s:.2f} s, others' CPU {run.others_cpu_s:.1f} s",
                file=sys.stderr,
            )
            shutil.rmtree(out_dir, ignore_errors=True)
        if "floor" in tools and out_bytes:
            floor = next((t for t in runs if t.name == "floor"), None)
            if floor is None:
                cmd = floor_command(inputs, stack / "out-floor", out_bytes, direct=True)
                floor = ToolRuns("floor", timed(cmd))
                runs.append(floor)
            run = time_once(
                floor, stack / "out-floor", stack / "floor.log", inputs, 0, cold=args.cold
            )
            floor.walls_s.append(run.wall_s)
            floor.peak_rss_bytes.append(run.peak_rss_bytes)
            floor.own_cpu_s.append(run.own_cpu_s)
            floor.others_cpu_s.append(run.others_cpu_s)
            print(
                f"repeat {repeat + 1} floor: {run.wall_s:.2f} s, user+sys {run.own_cpu_s:.2f} s, "
                f"others' CPU {run.others_cpu_s:.1f} s",
                file=sys.stderr,
            )
            shutil.rmtree(stack / "out-floor", ignore_errors=True)
    medians = {t.name: statistics.median(t.walls_s) for t in runs if t.walls_s}
    floor_s = medians.get("floor")
    rows = [
        "| run | median wall (s) | runs (s) | user+sys (s) | others' CPU (s) | peak RSS (GB) "
        "| wall / floor |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for t in runs:
        if t.walls_s:
            ratio = f"{medians[t.name] / floor_s:.2f}" if floor_s else "-"
            walls = ", ".join(f"{w:.2f}" for w in t.walls_s)
            cpu = ", ".join(f"{c:.2f}" for c in t.own_cpu_s)
            others = ", ".join(f"{c:.1f}" for c in t.others_cpu_s)
            rss = max(t.peak_rss_bytes) / 1e9
            rows.append(
                f"| {t.name} | {medians[t.name]:.2f} | {walls} | {cpu} | {others} | {rss:.2f} "
                f"| {ratio} |"
            )
    table = "\n".join(rows)
    cache = (
        "page cache dropped before each run, timed until `sync`" if args.cold else "warm page cache"
    )
    machine = machine_info()
    print(
        f"## {args.size} stack: {num_layers} -> {num_layers * 3 // 2} layers, "
        f"{input_bytes / 1e9:.3f} GB of inputs, {out_bytes / 1e9:.3f} GB written\n\n"
        f"Machine: {machine['nproc']} CPUs; {cache}; floor: dd reads, "
        f"dd oflag=direct bs=8M write.\n\n{table}"
    )
    result = {"size": args.size, "machine": machine, "markdown": table, "walls": medians}
    name = f"stack-{args.size}{'-cold' if args.cold else ''}.json"
    (DATA_DIR / name).write_text(json.dumps(result, indent=2))
    return 1 if any(t.failed for t in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
