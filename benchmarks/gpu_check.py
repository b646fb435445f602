"""The whole GPU story in one command: GPU tests, then CUDA vs 16-core CPU vs the I/O floor.

    bash benchmarks/gpu_check.sh RESULTS_DIR              # on the GPU machine (a few minutes)
    bash benchmarks/gpu_check.sh --quick RESULTS_DIR      # anywhere: tiny pair, CUDA if present

Steps, each logged to stderr as it goes:

1. `pytest -m gpu` (every test marked gpu; they skip themselves without CUDA).
2. For each size (medium, wide; --quick: tiny), the pair of benchmarks/make_pair.py on local
   disk, then alternating repeats of: shardmerge --device cuda, shardmerge --device cpu, the
   floor with buffered writes (`dd` into the page cache) and the floor with direct writes
   (`dd oflag=direct`, as shardmerge writes). Every run starts from a flushed disk and warm
   inputs; wall time around the process, peak RSS from wait4, peak GPU memory from the process
   itself (benchmarks/gpu_probe.py).
3. The outputs: CUDA's agrees with the CPU's within one bf16 step (benchmarks/compare.py), and
   every tensor whose t is 0 or 1 is byte-identical to its input on both devices.
4. One more CUDA run per size under the profiler (gpu_probe.py --profile): where the time goes.
5. One table (stdout, RESULTS_DIR/table.md), the targets of the GPU issue checked, everything in
   RESULTS_DIR/results.json. Exit 1 if a test, a run or a check failed; a missed target is
   reported, not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from compare import compare_checkpoints, format_comparison  # noqa: E402
from family import family_config  # noqa: E402
from make_pair import PRESETS, ensure_pair  # noqa: E402
from run import floor_command, prepare_pair, warm_cache  # noqa: E402

# The GPU issue's targets, for the wide pair on CUDA.
TARGET_WALL_TO_FLOOR = 1.2
TARGET_RSS_BYTES = 600e6
TARGET_GPU_BYTES = 2e9
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass
class Tool:
    name: str  # cuda, cpu, floor, floor-direct
    command: list[str]
    stats_path: Path | None = None  # gpu_probe's stats (shardmerge runs)
    inputs: list[Path] = field(default_factory=list)  # warmed before each run (default: the pair)
    walls_s: list[float] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    peak_gpu_bytes: list[int] = field(default_factory=list)
    process_stats: list[dict[str, Any]] = field(default_factory=list)  # gpu_probe's, per run
    failed: str | None = None


def direct_floor_command(inputs: list[Path], out_dir: Path, out_bytes: int) -> list[str]:
    """The floor, but the output written with O_DIRECT (as shardmerge writes it) rather than
    into the page cache: on a machine with much RAM a buffered `dd` never waits for the disk."""
    command = floor_command(inputs, out_dir, out_bytes)
    command[-1] = command[-1].replace("iflag=count_bytes", "iflag=count_bytes oflag=direct")
    return command


def shardmerge_command(python: str, config: Path, out: Path, device: str, stats: Path) -> list[str]:
    probe = str(HERE / "gpu_probe.py")
    run = ["run", str(config), "--out", str(out), "--overwrite", "--quiet", "--device", device]
    return [python, probe, "--stats", str(stats), "--", *run]


def time_once(tool: Tool, out_dir: Path, inputs: list[Path], log_path: Path) -> None:
    """One run: empty output, flushed disk, warm inputs; wall around the process, RSS by wait4."""
    shutil.rmtree(out_dir, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    warm_cache(inputs)
    if tool.stats_path is not None:
        tool.stats_path.unlink(missing_ok=True)
    measured = log_path.with_suffix(".measure.json")
    measured.unlink(missing_ok=True)
    # Timed by a fresh small process (measure.py), so this one's pages are not in the peak RSS.
    command = [sys.executable, "-S", str(HERE / "measure.py"), str(measured), "--", *tool.command]
    with open(log_path, "wb") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_env()).returncode
    if code != 0 or not measured.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        tool.failed = f"exit {code}, log {log_path}:\n{tail}"
        return
    run = json.loads(measured.read_text())
    tool.walls_s.append(run["wall_s"])
    tool.peak_rss_bytes.append(run["peak_rss_bytes"])
    if tool.stats_path is not None:
        process = json.loads(tool.stats_path.read_text())
        tool.process_stats.append(process | {"wall_s": run["wall_s"]})
        memory = process.get("gpu_memory")
        if memory:
            tool.peak_gpu_bytes.append(memory["max_memory_allocated"])


def _env() -> dict[str, str]:
    env = os.environ | OFFLINE_ENV
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def check_exact_copies(config: Path, outputs: dict[str, Path]) -> tuple[list[str], int]:
    """Every tensor the plan copies (t = 0 or 1, same dtype in and out) must be its input's bytes,
    on every device: the design promises it. Returns the problems found and the count checked."""
    from safetensors import safe_open

    from shardmerge.pipeline import prepare
    from shardmerge.recipe import load_recipe

    prepared = prepare(load_recipe(config))
    model_dirs = {"a": prepared.model_a.local_dir, "b": prepared.model_b.local_dir}
    problems: list[str] = []
    copies = [
        task
        for task in prepared.plan.tasks
        if task.t in (0.0, 1.0) and task.is_float and task.a.dtype == task.out_dtype
    ]
    for label, out in outputs.items():
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        for task in copies:
            side = "a" if task.t == 0.0 else "b"
            info = task.a if side == "a" else task.b
            folder = model_dirs[side]
            assert folder is not None, "the benchmark's models are local folders"
            with (
                safe_open(folder / info.file, "pt") as src,
                safe_open(out / index[task.name], "pt") as dst,
            ):
                if not _same_bytes(src.get_tensor(task.name), dst.get_tensor(task.name)):
                    problems.append(
                        f"{label}: {task.name} (t = {task.t:g}) differs from model {side}"
                    )
    return problems, len(copies)


def _same_bytes(x: Any, y: Any) -> bool:
    """Bit for bit (NaN payloads and signed zeros included), not numerically equal."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    return bool(x.reshape(-1).view(torch_uint8()).equal(y.reshape(-1).view(torch_uint8())))


def torch_uint8() -> Any:
    import torch

    return torch.uint8


def run_gpu_tests(python: str, results: Path) -> dict[str, Any]:
    log = results / "pytest-gpu.log"
    # A module that fails to import is an error, but must not hide the GPU tests of the others.
    command = [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "tests"]  # fmt: skip
    print(f"$ {' '.join(command)}", file=sys.stderr)
    with open(log, "wb") as fh:
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    text = log.read_text(errors="replace")
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", text)
    }
    lines = [line for line in text.splitlines() if line.strip()]
    summary = lines[-1] if lines else "(no output)"
    print(f"pytest -m gpu: {summary}", file=sys.stderr)
    return {
        "exit_code": done.returncode,
        "summary": summary,
        "counts": counts,
        "seconds": round(time.perf_counter() - start, 1),
        # 5: nothing selected (no gpu test at all) counts as a failure of the check
        "ok": done.returncode == 0 and counts.get("failed", 0) == 0,
    }


def machine_info(data_dir: Path) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "git": os.environ.get("SHARDMERGE_GIT") or _git_head(),
    }
    try:  # where the pairs and outputs go: a tmpfs or a network disk changes everything
        df = subprocess.run(["df", "-T", "-h", str(data_dir)], capture_output=True, text=True)
        info["data_disk"] = " ".join(df.stdout.splitlines()[-1].split()[:4])
    except (OSError, IndexError):
        info["data_disk"] = "?"
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def _git_head() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


def bench_size(
    size: str, args: argparse.Namespace, devices: list[str], results: Path
) -> dict[str, Any]:
    spec = PRESETS[size]
    work = (args.data_dir / size).resolve()
    started = time.perf_counter()
    pair = prepare_pair(spec, work)
    generated_s = time.perf_counter() - started
    config, inputs = pair.config, pair.inputs
    input_bytes, out_bytes = pair.input_bytes, pair.out_bytes
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    tools = []
    for device in devices:
        stats = work / f"stats-{device}.json"
        out = work / f"out-{device}"
        tools.append(
            Tool(device, shardmerge_command(args.python, config, out, device, stats), stats)
        )
    tools.append(Tool("floor", floor_command(inputs, work / "out-floor", out_bytes)))
    tools.append(
        Tool("floor-direct", direct_floor_command(inputs, work / "out-floor-direct", out_bytes))
    )
    family_inputs: list[Path] = []
    if args.methods:
        # The N-model methods on a family (benchmarks/family.py's): the pair's A as the base,
        # its B and a second pair's B as the fine-tunes; a floor of its own (three inputs).
        second = (args.data_dir / f"{size}-second").resolve()
        ensure_pair(replace(spec, seed=spec.seed + 1, shard_size_b_bytes=400_000_000), second)
        base, tunes = work / "a", [work / "b", second / "b"]
        family_inputs = [*inputs, *sorted((second / "b").glob("*.safetensors"))]
        for method in args.methods:
            method_config = work / f"{method}.yml"
            method_config.write_text(family_config(method, base, tunes))
            for device in devices:
                name = f"{device} {method}"
                stats = work / f"stats-{device}-{method}.json"
                out = work / f"out-{name}"
                command = shardmerge_command(args.python, method_config, out, device, stats)
                tools.append(Tool(name, command, stats, inputs=family_inputs))
        tools.append(
            Tool(
                "floor-direct family",
                direct_floor_command(family_inputs, work / "out-floor-direct family", out_bytes),
                inputs=family_inputs,
            )
        )

    for repeat in range(args.repeats):
        for tool in tools:
            if tool.failed:
                continue
            log = logs / f"{tool.name.replace(' ', '-')}-{repeat + 1}.log"
            time_once(tool, work / f"out-{tool.name}", tool.inputs or inputs, log)
            if tool.failed:
                print(f"{size} {tool.name} FAILED: {tool.failed}", file=sys.stderr)
                continue
            gpu = f", GPU {tool.peak_gpu_bytes[-1] / 1e9:.2f} GB" if tool.peak_gpu_bytes else ""
            print(
                f"{size} repeat {repeat + 1}/{args.repeats} {tool.name}: {tool.walls_s[-1]:.2f} s, "
                f"RSS {tool.peak_rss_bytes[-1] / 1e9:.2f} GB{gpu}",
                file=sys.stderr,
            )

    checks: dict[str, Any] = {}
    ran = {t.name: work / f"out-{t.name}" for t in tools if t.name in devices and t.walls_s}
    if ran:
        problems, copies = check_exact_copies(config, ran)
        checks["exact_copies"] = {"tensors": copies, "devices": sorted(ran), "problems": problems}
        print(
            f"{size}: {copies} copied tensors x {sorted(ran)}: {problems or 'byte-identical'}",
            file=sys.stderr,
        )
    if {"cuda", "cpu"} <= ran.keys():
        comparison = compare_checkpoints(ran["cuda"], ran["cpu"])
        checks["cuda_vs_cpu"] = comparison.to_dict()
        checks["cuda_vs_cpu_text"] = format_comparison(comparison, "cuda", "cpu")
        print(checks["cuda_vs_cpu_text"], file=sys.stderr)
    for method in args.methods:
        outs = {d: work / f"out-{d} {method}" for d in ("cuda", "cpu")}
        ok = all(any(t.name == f"{d} {method}" and t.walls_s for t in tools) for d in outs)
        if ok:
            comparison = compare_checkpoints(outs["cuda"], outs["cpu"])
            checks[f"cuda_vs_cpu {method}"] = comparison.to_dict()
            text = format_comparison(comparison, f"cuda {method}", f"cpu {method}")
            checks[f"cuda_vs_cpu_text {method}"] = text
            print(text, file=sys.stderr)

    profile = None
    profile_device = "cuda" if "cuda" in devices else "cpu"
    if not args.no_profile:
        profile = profile_run(
            args, config, work, inputs, profile_device, results / f"trace-{size}.json.gz"
        )
    for tool in tools:
        shutil.rmtree(work / f"out-{tool.name}", ignore_errors=True)
    return {
        "size": size,
        "input_bytes": input_bytes,
        "output_bytes": out_bytes,
        "generate_s": round(generated_s, 1),
        "tools": {t.name: asdict(t) for t in tools},
        "checks": checks,
        "profile": profile,
        "profile_device": profile_device,
    }


def profile_run(
    args: argparse.Namespace, config: Path, work: Path, inputs: list[Path], device: str, trace: Path
) -> dict[str, Any] | None:
    out = work / "out-profile"
    stats, profile = work / "stats-profile.json", work / "profile.json"
    command = shardmerge_command(args.python, config, out, device, stats)
    command[2:2] = ["--profile", str(profile)] + (
        ["--trace", str(trace)] if device == "cuda" else []
    )
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    warm_cache(inputs)
    log = work / "logs" / "profile.log"
    with open(log, "wb") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        print(f"profile run failed (exit {done.returncode}), log {log}", file=sys.stderr)
        return None
    return json.loads(profile.read_text())


def summarize(size_result: dict[str, Any]) -> list[dict[str, Any]]:
    tools = size_result["tools"]
    floor = tools.get("floor", {}).get("walls_s") or []
    direct = tools.get("floor-direct", {}).get("walls_s") or []
    cpu = tools.get("cpu", {}).get("walls_s") or []

    def ratio(walls: list[float], ref: list[float]) -> float | None:
        pairs = [w / r for w, r in zip(walls, ref, strict=False)]
        return statistics.median(pairs) if pairs else None

    family_direct = tools.get("floor-direct family", {}).get("walls_s") or []

    rows = []
    for name, tool in tools.items():
        walls = tool["walls_s"]
        median = statistics.median(walls) if walls else None
        method = name.split(" ", 1)[1] if " " in name and not name.startswith("floor") else None
        own_cpu = cpu if method is None else tools.get(f"cpu {method}", {}).get("walls_s") or []
        own_direct = direct if method is None and "family" not in name else family_direct
        rows.append({
            "size": size_result["size"],
            "tool": name if not tool["failed"] else f"{name} (FAILED)",
            "median_wall_s": median,
            "runs_s": walls,
            "input_gb_per_s": size_result["input_bytes"] / median / 1e9 if median else None,
            "peak_rss_bytes": max(tool["peak_rss_bytes"]) if tool["peak_rss_bytes"] else None,
            "peak_gpu_bytes": max(tool["peak_gpu_bytes"]) if tool["peak_gpu_bytes"] else None,
            "to_floor": ratio(walls, floor) if method is None and "family" not in name else None,
            "to_floor_direct": ratio(walls, own_direct),
            "to_cpu": ratio(walls, own_cpu) if not name.startswith("cpu") else None,
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale, spec)

    lines = [
        "| size | run | median wall (s) | runs (s) | input GB/s | peak RSS (GB) | peak GPU (GB) "
        "| / floor | / floor-direct | / cpu |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = ", ".join(f"{w:.2f}" for w in r["runs_s"]) or "-"
        lines.append(
            f"| {r['size']} | {r['tool']} | {fmt(r['median_wall_s'], '.2f')} | {runs} "
            f"| {fmt(r['input_gb_per_s'], '.2f')} | {fmt(r['peak_rss_bytes'], '.2f', 1e9)} "
            f"| {fmt(r['peak_gpu_bytes'], '.2f', 1e9)} | {fmt(r['to_floor'], '.2f')} "
            f"| {fmt(r['to_floor_direct'], '.2f')} | {fmt(r['to_cpu'], '.2f')} |"
        )
    return "\n".join(lines)


def phases_text(per_size: list[dict[str, Any]]) -> str:
    """Where each shardmerge run's wall time goes, medians over its repeats, and its memory."""
    lines = [
        "| size | run | wall | start-up | import torch | prepare | merge | of it CUDA start "
        "| finish | peak RSS | of it anon / file at exit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in per_size:
        for name, tool in result["tools"].items():
            runs = tool.get("process_stats") or []
            if not runs:
                continue

            def med(get: Any, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(get(r) for r in runs)

            def phase(r: dict[str, Any], key: str) -> float:
                return float(r.get("phases_s", {}).get(key, 0.0))

            wall = med(lambda r: r["wall_s"])
            startup = med(lambda r: r["wall_s"] - r["wall_in_process_s"])
            torch_s = med(lambda r: phase(r, "import_torch"))
            merge = med(lambda r: phase(r, "merge_shards") - phase(r, "import_torch_in_merge"))
            memory = runs[-1].get("memory", {})
            anon, file = memory.get("RssAnon"), memory.get("RssFile")
            split = "-" if anon is None or file is None else f"{anon / 1e9:.2f} / {file / 1e9:.2f}"
            hwm = memory.get("VmHWM")
            lines.append(
                f"| {result['size']} | {name} | {wall:.2f} | {startup:.2f} | {torch_s:.2f} "
                f"| {med(lambda r: phase(r, 'prepare')):.2f} | {merge:.2f} "
                f"| {med(lambda r: phase(r, 'cuda_start')):.2f} "
                f"| {med(lambda r: phase(r, 'finish_output')):.2f} "
                f"| {'-' if hwm is None else f'{hwm / 1e9:.2f}'} | {split} |"
            )
    lines.append(
        "\n(seconds, medians; start-up: the interpreter and imports before the CLI runs; merge: "
        "the merge_shards phase without torch's import, i.e. buffers, CUDA's start, the engine; "
        "CUDA start: registering the slots, the first CUDA call (it creates the context); "
        "RSS in GB as the process saw it at its exit, VmHWM and its anonymous and file pages)"
    )
    return "\n".join(lines)


def profile_text(size: str, device: str, profile: dict[str, Any] | None) -> str:
    if not profile:
        return f"{size}: no profile"
    host = profile["host"]
    lines = [
        f"{size}, --device {device}: engine wall {host['merge_wall_s']:.2f} s; busy seconds "
        "(summed over the threads of each role; / wall above 1 = more than one thread busy):"
    ]
    for role, r in host["roles"].items():
        lines.append(
            f"  {role:8s} {r['busy_s']:7.2f} s  ({r['busy_per_merge_s']} x wall, "
            f"{r['calls']} calls, threads {', '.join(r['threads'])})"
        )
    device_part = profile.get("device")
    if device_part:
        lines.append(
            f"  GPU busy {device_part['device_busy_ms']:.0f} ms of the engine's "
            f"{device_part['wall_ms']:.0f} ms"
        )
        for cat in ("h2d", "kernel", "d2h", "d2d", "memset"):
            if cat in device_part:
                c = device_part[cat]
                overlap = c.get("overlapping_kernels_ms")
                extra = "" if overlap is None else f", {overlap:.0f} ms of it during kernels"
                lines.append(f"  {cat:8s} {c['count']:6d} ops, busy {c['busy_ms']:8.1f} ms{extra}")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], tests: dict[str, Any] | None) -> list[str]:
    """The GPU issue's targets (wide pair on CUDA), each PASS / MISS / n/a."""
    by = {(r["size"], r["tool"]): r for r in rows}
    wide = by.get(("wide", "cuda"))

    def line(ok: bool | None, text: str) -> str:
        return f"{'n/a ' if ok is None else 'PASS' if ok else 'MISS'} {text}"

    out = []
    if wide is None:
        out.append(line(None, "wide pair on CUDA not run (no CUDA, or --quick / --sizes)"))
    else:
        for key, limit, label, scale in (
            ("to_floor", TARGET_WALL_TO_FLOOR, "wall / floor", 1),
            ("peak_rss_bytes", TARGET_RSS_BYTES, "peak host RSS (GB)", 1e9),
            ("peak_gpu_bytes", TARGET_GPU_BYTES, "peak GPU memory (GB)", 1e9),
        ):
            value = wide[key]
            ok = None if value is None else value <= limit
            shown = "-" if value is None else f"{value / scale:.2f}"
            out.append(line(ok, f"wide cuda {label} {shown} <= {limit / scale:g}"))
        if wide["to_floor_direct"] is not None:
            out.append(
                line(
                    wide["to_floor_direct"] <= TARGET_WALL_TO_FLOOR,
                    f"wide cuda wall / floor-direct {wide['to_floor_direct']:.2f} "
                    f"<= {TARGET_WALL_TO_FLOOR}",
                )
            )
    for size in sorted({r["size"] for r in rows}):
        cuda = by.get((size, "cuda"))
        if cuda and cuda["to_cpu"] is not None:
            out.append(
                line(
                    cuda["to_cpu"] < 1,
                    f"{size}: cuda faster than cpu (cuda / cpu {cuda['to_cpu']:.2f})",
                )
            )
    if tests is not None:
        out.append(line(tests["ok"], f"GPU tests: {tests['summary']}"))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="folder for table.md, results.json, logs")
    parser.add_argument("--quick", action="store_true", help="tiny pair, one repeat: seconds")
    parser.add_argument("--sizes", help="comma-separated (default medium,wide; --quick: tiny)")
    parser.add_argument("--repeats", type=int, help="alternating repeats (default 3; --quick 1)")
    parser.add_argument(
        "--devices", help="shardmerge devices (default cuda,cpu; cuda only if present)"
    )
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data" / "gpu-check")
    parser.add_argument("--python", default=sys.executable, help="interpreter for shardmerge runs")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--methods",
        default="",
        help="also time these N-model methods (e.g. ties,dare_ties) on a family per size",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = (args.sizes or ("tiny" if args.quick else "medium,wide")).split(",")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown or args.repeats < 1:
        print(f"gpu_check: unknown size {unknown} (known: {sorted(PRESETS)})", file=sys.stderr)
        return 2
    import torch

    wanted = (args.devices or "cuda,cpu").split(",")
    devices = [d for d in wanted if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    if "cuda" in wanted and "cuda" not in devices:
        print("gpu_check: no CUDA device here: CPU runs only", file=sys.stderr)
    args.results.mkdir(parents=True, exist_ok=True)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info(args.data_dir)
    print(f"machine: {machine}", file=sys.stderr)

    tests = None if args.skip_tests else run_gpu_tests(args.python, args.results)
    per_size = [bench_size(size, args, devices, args.results) for size in sizes]
    rows = [row for result in per_size for row in summarize(result)]
    table = markdown(rows)
    profiles = "\n\n".join(
        profile_text(r["size"], r["profile_device"], r["profile"]) for r in per_size
    )
    target_lines = targets(rows, tests)
    failures = [
        f"{r['size']} {name}: {t['failed']}"
        for r in per_size
        for name, t in r["tools"].items()
        if t["failed"]
    ]
    for r in per_size:
        exact = r["checks"].get("exact_copies")
        if exact and exact["problems"]:
            failures.append(f"{r['size']}: copied tensors differ: {exact['problems'][:3]}")
        for key, agree in r["checks"].items():
            if key.startswith("cuda_vs_cpu") and "text" not in key and not agree["ok"]:
                failures.append(f"{r['size']} {key}: CUDA and CPU disagree beyond one bf16 step")
    if tests is not None and not tests["ok"]:
        failures.append(f"GPU tests failed: {tests['summary']}")

    reps = f"{args.repeats} alternating repeat{'s' if args.repeats > 1 else ''}"
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    report = [
        f"# gpu_check ({'quick' if args.quick else 'full'}), git {machine['git']}",
        "",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['ram_gib']} GiB RAM{gpu}; "
        f"torch {machine['torch']}; data on {machine['data_disk']}; warm page cache; {reps}.",
        "",
        table,
        "",
        "Agreement:",
    ]
    for r in per_size:
        exact = r["checks"].get("exact_copies")
        if exact:
            verdict = (
                "byte-identical" if not exact["problems"] else f"{len(exact['problems'])} differ"
            )
            report.append(
                f"- {r['size']}: the {exact['tensors']} copied tensors (t = 0 or 1) on "
                f"{', '.join(exact['devices'])}: {verdict}"
            )
        for key, text in r["checks"].items():
            if key.startswith("cuda_vs_cpu_text"):
                what = ("cuda vs cpu" + key[len("cuda_vs_cpu_text") :]).strip()
                report.append(f"- {r['size']}, {what}:\n\n```\n{text}\n```")
    report += ["", "Phases of the timed runs:", "", phases_text(per_size)]
    report += [
        "",
        "Profile:",
        "",
        "```",
        profiles,
        "```",
        "",
        "Targets:",
        "",
        "```",
        *target_lines,
        "```",
    ]
    if failures:
        report += ["", "FAILURES:", *[f"- {f}" for f in failures]]
    report.append(f"\n(gpu_check took {time.perf_counter() - started:.0f} s)")
    text = "\n".join(report)
    print(text)
    (args.results / "table.md").write_text(text + "\n")
    (args.results / "results.json").write_text(json.dumps({
        "machine": machine, "quick": args.quick, "repeats": args.repeats, "tests": tests,
        "sizes": per_size, "rows": rows, "targets": target_lines, "failures": failures,
    }, indent=2, default=str))  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
