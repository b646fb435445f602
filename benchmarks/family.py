"""Time the N-model methods on a "family": a base and two fine-tunes, against mergekit and a floor.

    .venv/bin/python benchmarks/family.py --size medium --methods ties,dare_ties --repeats 3
    .venv/bin/python benchmarks/family.py --size tiny --tools shardmerge,floor --repeats 1
    .venv/bin/python benchmarks/family.py --size wide --fine-tunes 3 --tools shardmerge --repeats 1

The base and the first fine-tune are make_pair.py's A and B; the second fine-tune is the B of a
second pair (another seed), sharded differently again; with ``--fine-tunes N`` the k-th (k > 2)
is the B of a k-th pair (DATA_DIR/SIZE-ftK). Each repeat runs every tool once per
method, alternating, under `/usr/bin/time -v` from a warm page cache (run.py's machinery). The
floor reads the three inputs once and writes one model's bytes with `dd oflag=direct bs=8M`
(O_DIRECT, as shardmerge writes: a buffered write sometimes stays in the page cache and sometimes
waits for writeback). Results: a markdown table on stdout, JSON in DATA_DIR/family-SIZE.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_pair import DATA_DIR, PRESETS, ensure_pair  # noqa: E402
from run import (  # noqa: E402
    DEFAULT_MERGEKIT,
    DEFAULT_SHARDMERGE,
    ToolRuns,
    floor_command,
    machine_info,
    safetensors_files,
    time_once,
)

METHOD_PARAMS = {
    "linear": "weight: {w}",
    "task_arithmetic": "weight: {w}",
    "ties": "weight: {w}, density: 0.5",
    "dare_ties": "weight: {w}, density: 0.5",
    "dare_linear": "weight: {w}, density: 0.5",
    "breadcrumbs_ties": "weight: {w}, density: 0.5, gamma: 0.01",
    "della": "weight: {w}, density: 0.5, epsilon: 0.1",
    "model_stock": "",  # no per-model parameters
    "karcher": "",
    "sce": "",
    "arcee_fusion": "",
    "ram": "",
    "ramplus_tl": "",
}
# Shared parameters, where a method's defaults would not show its work.
METHOD_SHARED = {
    "karcher": "max_iter: 10, tol: 1.0e-5",
    "sce": "select_topk: 0.5",
    "ties": "int8_mask: true",
    "dare_ties": "int8_mask: true",
    "breadcrumbs_ties": "int8_mask: true",
    "della": "int8_mask: true",
}


def family_config(method: str, base: Path, fine_tunes: list[Path]) -> str:
    """A mergekit config (shardmerge runs it unchanged) of ``method`` over the family."""
    lines = [f"merge_method: {method}"]
    models = list(fine_tunes)
    if method == "arcee_fusion":  # the base and one model
        models = models[:1]
    if method in ("linear", "karcher"):
        models = [base, *fine_tunes]
    else:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    weight = round(1 / len(models), 4)
    for path in models:
        params = METHOD_PARAMS[method].format(w=weight)
        lines.append(f"  - model: {path}")
        if params:
            lines.append(f"    parameters: {{{params}}}")
    if method in METHOD_SHARED:
        lines.append(f"parameters: {{{METHOD_SHARED[method]}}}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--methods", default="ties,dare_ties,linear,task_arithmetic")
    parser.add_argument("--tools", default="shardmerge,mergekit,floor")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=1, help="mergekit is slow")
    parser.add_argument("--shardmerge-bin", default=str(DEFAULT_SHARDMERGE))
    parser.add_argument("--mergekit-bin", default=str(DEFAULT_MERGEKIT))
    parser.add_argument("--quiet-wait-s", type=float, default=20.0)
    parser.add_argument(
        "--fine-tunes", type=int, default=2, help="how many fine-tunes of the base (2 or more)"
    )
    args = parser.parse_args(argv)
    if args.fine_tunes < 2:
        parser.error("--fine-tunes: at least 2")
    methods = args.methods.split(",")
    tools = args.tools.split(",")

    spec = PRESETS[args.size]
    work = (DATA_DIR / args.size).resolve()
    ensure_pair(spec, work)
    base, fine_tunes = work / "a", [work / "b"]
    for k in range(2, args.fine_tunes + 1):
        name = f"{args.size}-second" if k == 2 else f"{args.size}-ft{k}"
        other = (DATA_DIR / name).resolve()
        ensure_pair(replace(spec, seed=spec.seed + k - 1, shard_size_b_bytes=400_000_000), other)
        fine_tunes.append(other / "b")
    inputs = safetensors_files(base) + [p for f in fine_tunes for p in safetensors_files(f)]
    input_bytes = sum(p.stat().st_size for p in inputs)
    out_bytes = sum(p.stat().st_size for p in safetensors_files(base))
    fam = work / "family"
    fam.mkdir(exist_ok=True)
    machine = machine_info()

    runs: list[ToolRuns] = []
    floor = ToolRuns("floor", floor_command(inputs, fam / "out-floor", out_bytes, direct=True))
    if "floor" in tools:
        runs.append(floor)
    for method in methods:
        config = fam / f"{method}.yml"
        config.write_text(family_config(method, base, fine_tunes))
        if "shardmerge" in tools:
            out = fam / f"out-shardmerge-{method}"  # the loop below deletes it after each run
            cmd = [args.shardmerge_bin, "run", str(config), "--out", str(out), "--overwrite"]
            runs.append(ToolRuns(f"shardmerge {method}", [*cmd, "--quiet"]))
        if "mergekit" in tools and Path(args.mergekit_bin).exists():
            out = fam / f"out-mergekit-{method}"
            runs.append(ToolRuns(f"mergekit {method}", [args.mergekit_bin, str(config), str(out)]))
    for repeat in range(max(args.repeats, args.mergekit_repeats)):
        for tool in runs:
            limit = args.mergekit_repeats if tool.name.startswith("mergekit") else args.repeats
            if tool.failed or repeat >= limit:
                continue
            out_dir = fam / ("out-" + tool.name.replace(" ", "-"))
            log = fam / (tool.name.replace(" ", "-") + f"-{repeat + 1}.log")
            run = time_once(tool, out_dir, log, inputs, args.quiet_wait_s)
            if run.returncode != 0:
                tool.failed = f"exit {run.returncode}, log {log}"
                print(f"{tool.name} FAILED: {tool.failed}", file=sys.stderr)
                continue
            tool.walls_s.append(run.wall_s)
            tool.peak_rss_bytes.append(run.peak_rss_bytes)
            tool.cpu_busy_before.append(run.cpu_busy_before)
            tool.others_cpu_s.append(run.others_cpu_s)
            tool.own_cpu_s.append(run.own_cpu_s)
            print(
                f"repeat {repeat + 1} {tool.name}: {run.wall_s:.2f} s, user+sys "
                f"{run.own_cpu_s:.2f} s, peak RSS {run.peak_rss_bytes / 1e9:.2f} GB "
                f"(others' CPU {run.others_cpu_s:.1f} s)",
                file=sys.stderr,
            )
            shutil.rmtree(out_dir, ignore_errors=True)

    floor_s = statistics.median(floor.walls_s) if floor.walls_s else None
    rows = [
        "| run | median wall (s) | runs (s) | user+sys (s) | peak RSS (GB) | wall / floor "
        "| mergekit / shardmerge |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    medians = {t.name: statistics.median(t.walls_s) for t in runs if t.walls_s}
    for t in runs:
        if not t.walls_s:
            continue
        wall = medians[t.name]
        ratio = f"{wall / floor_s:.2f}" if floor_s else "-"
        speedup = "-"
        if t.name.startswith("shardmerge"):
            other = medians.get(t.name.replace("shardmerge", "mergekit"))
            speedup = f"{other / wall:.1f}x" if other else "-"
        walls = ", ".join(f"{w:.2f}" for w in t.walls_s)
        cpu = ", ".join(f"{c:.2f}" for c in t.own_cpu_s)
        rows.append(
            f"| {t.name} | {wall:.2f} | {walls} | {cpu} | {max(t.peak_rss_bytes) / 1e9:.2f} "
            f"| {ratio} | {speedup} |"
        )
    table = "\n".join(rows)
    print(
        f"## {args.size} family: a base and {len(fine_tunes)} fine-tunes, {input_bytes / 1e9:.2f} GB of bf16 "
        f"inputs\n\nMachine: {machine['nproc']} CPUs, load at start "
        f"{machine['load_avg_1min_at_start']}; warm page cache.\n\n{table}"
    )
    result = {"size": args.size, "machine": machine, "markdown": table, "walls": medians}
    suffix = "" if args.fine_tunes == 2 else f"-ft{args.fine_tunes}"
    (DATA_DIR / f"family-{args.size}{suffix}.json").write_text(json.dumps(result, indent=2))
    return 1 if any(t.failed for t in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
