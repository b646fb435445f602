"""Time shardmerge, mergekit and an I/O floor on the same SLERP merge, alternating runs.

    .venv/bin/python benchmarks/run.py --size medium --repeats 3
    .venv/bin/python benchmarks/run.py --size tiny --tools mergekit,floor --repeats 1

Each repeat runs every tool once, in --tools order, from a warm page cache, each under
`/usr/bin/time -v` for its peak RSS. Afterwards shardmerge's and mergekit's outputs are compared
tensor by tensor (compare.py). Results go to stdout as a markdown table and to a JSON file.
See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import compare_checkpoints, format_comparison  # noqa: E402
from make_pair import DATA_DIR, PRESETS, PairSpec, ensure_pair, tensor_shapes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("shardmerge", "mergekit", "floor", "read", "write", "mixed", "baseline")
DEFAULT_TOOLS = ("shardmerge", "mergekit", "floor")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
DEFAULT_SHARDMERGE = REPO / ".venv" / "bin" / "shardmerge"
DEFAULT_MERGEKIT = REPO / "benchmarks" / ".venv-mergekit" / "bin" / "mergekit-yaml"
GNU_TIME = "/usr/bin/time"
# CPU busy fraction (all cores) on an idle machine stays near 0; above this, others are running.
BUSY_WARNING = 0.1
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# A run is flagged when others used more than this fraction of one CPU, on average, during it.
OTHERS_CPU_WARNING = 0.1
# ... plus this much, for clock-tick rounding and the kernel's own writeback work.
OTHERS_CPU_SLACK_S = 0.5
READ_BUFFER_BYTES = 16 << 20
# Every tool runs offline: the inputs are local, and a hub lookup would only add DNS timeouts.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass
class ToolRuns:
    """One tool's command and the measurements of each of its runs."""

    name: str
    command: list[str]
    version: str | None = None
    walls_s: list[float] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    # Busy fraction of all CPUs in the second before each run: above ~0.1 something else ran.
    cpu_busy_before: list[float] = field(default_factory=list)
    # CPU seconds spent on anything else during each run (others' work, kernel writeback).
    others_cpu_s: list[float] = field(default_factory=list)
    # The command's own user + sys seconds in each run.
    own_cpu_s: list[float] = field(default_factory=list)
    # --cold: the disk during each run (DiskSampler.summary)
    disk: list[dict[str, float] | None] = field(default_factory=list)
    failed: str | None = None


def slerp_config_yaml(model_a: Path, model_b: Path, num_layers: int) -> str:
    """The canonical mergekit gradient-SLERP recipe (shardmerge accepts it unchanged)."""
    return f"""\
merge_method: slerp
base_model: {model_a}
slices:
  - sources:
      - model: {model_a}
        layer_range: [0, {num_layers}]
      - model: {model_b}
        layer_range: [0, {num_layers}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def _model_bytes(spec: PairSpec) -> int:
    total = 0
    for _, shape in tensor_shapes(spec):
        n = 2  # bf16
        for d in shape:
            n *= d
        total += n
    return total


@dataclass(frozen=True)
class BenchPair:
    """A generated pair, ready to time: its gradient-SLERP config and the files to read."""

    config: Path
    models: list[list[Path]]  # each model's shard files
    input_bytes: int
    out_bytes: int  # the merged model holds the same tensors as A: as many bytes as A's shards

    @property
    def inputs(self) -> list[Path]:
        return [p for files in self.models for p in files]


def prepare_pair(spec: PairSpec, work: Path) -> BenchPair:
    """Generate the pair in ``work`` if missing, and write its config."""
    ensure_pair(spec, work)
    model_a, model_b = work / "a", work / "b"
    config = work / "slerp.yml"
    config.write_text(slerp_config_yaml(model_a, model_b, spec.layers))
    models = [safetensors_files(model_a), safetensors_files(model_b)]
    sizes = [sum(p.stat().st_size for p in files) for files in models]
    return BenchPair(config, models, sum(sizes), sizes[0])


def safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def floor_command(
    inputs: list[Path], out_dir: Path, out_bytes: int, direct: bool = False
) -> list[str]:
    """Read every input once and write out_bytes, with dd and 16 MiB buffers, nothing else.

    ``direct``: write as the `write` tool does (O_DIRECT, 8 MiB blocks, as shardmerge writes),
    so the write always reaches the disk instead of sometimes staying in the page cache."""
    reads = "\n".join(
        f"dd if={shlex.quote(str(p))} of=/dev/null bs=16M status=none" for p in inputs
    )
    out = out_dir / "floor.bin"
    if direct:
        write = _direct_write_dd(out, out_bytes)
    else:
        write = f"dd if=/dev/zero of={shlex.quote(str(out))} bs=16M count={out_bytes} \\\n"
        write += "iflag=count_bytes status=none"
    script = f"""set -e
{reads}
mkdir -p {shlex.quote(str(out_dir))}
{write}
"""
    return ["bash", "-c", script]


def _direct_write_dd(out: Path, out_bytes: int) -> str:
    """The `dd` writing out_bytes of zeros to ``out`` with O_DIRECT in 8 MiB blocks."""
    return (
        f"dd if=/dev/zero of={shlex.quote(str(out))} bs=8M count={out_bytes} "
        "iflag=count_bytes oflag=direct status=none"
    )


def _cat_jobs(models: list[list[Path]]) -> str:
    """One background `cat` per model reading its files, each pid appended to ``pids``."""
    return "\n".join(
        "cat " + " ".join(shlex.quote(str(p)) for p in files) + " > /dev/null & pids+=($!)"
        for files in models
    )


def concurrent_read_command(models: list[list[Path]]) -> list[str]:
    """Read every input once, one `cat` per model at the same time (the disk's best case for
    the reads: two streams in flight, no arithmetic)."""
    jobs = _cat_jobs(models)
    # `wait PID` for each, so a failed read fails the command (plain `wait` returns 0).
    return ["bash", "-c", f'set -e\npids=()\n{jobs}\nfor p in "${{pids[@]}}"; do wait "$p"; done']


def direct_write_command(out_dir: Path, out_bytes: int) -> list[str]:
    """Write as many bytes as the merged model, with O_DIRECT (as shardmerge writes)."""
    script = f"""set -e
mkdir -p {shlex.quote(str(out_dir))}
{_direct_write_dd(out_dir / "write.bin", out_bytes)}
"""
    return ["bash", "-c", script]


def mixed_io_command(models: list[list[Path]], out_dir: Path, out_bytes: int) -> list[str]:
    """Read every input (one `cat` per model) while writing the output's size with O_DIRECT,
    all at once: the merge's I/O with no arithmetic and no ordering between reads and writes.
    On a disk that shares one bandwidth between reads and writes this takes about read + write;
    on one that overlaps them, less."""
    jobs = _cat_jobs(models)
    write = _direct_write_dd(out_dir / "mixed.bin", out_bytes) + " & pids+=($!)"
    script = f"""set -e
mkdir -p {shlex.quote(str(out_dir))}
pids=()
{jobs}
{write}
for p in "${{pids[@]}}"; do wait "$p"; done
"""
    return ["bash", "-c", script]


def with_sync(command: list[str]) -> list[str]:
    """The command, then `sync`: a cold run counts the time until its output is on the disk."""
    return ["bash", "-c", '"$@" && sync', "with-sync", *command]


def drop_caches() -> None:
    """Flush dirty pages and empty the page cache, so the next run reads from the disk."""
    subprocess.run(["sync"], check=True)
    DROP_CACHES.write_text("3\n")


def can_drop_caches() -> str | None:
    """None if the page cache can be dropped here, else why not."""
    try:
        with DROP_CACHES.open("w") as fh:
            fh.write("1\n")  # the cheapest drop: clean page cache only
    except OSError as exc:
        return f"cannot write {DROP_CACHES} ({exc.strerror}; --cold needs root on Linux)"
    return None


class DiskSampler:
    """Samples /proc/diskstats for one device while a run lasts: how long the disk had no
    request in flight, the mean number in flight, and read / write throughput."""

    def __init__(self, device: str | None, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int, int]] = []  # time, in flight, rd, wr sectors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[int, int, int] | None:
        try:
            with open("/proc/diskstats") as fh:
                for line in fh:
                    fields = line.split()
                    if len(fields) > 11 and fields[2] == self.device:
                        return int(fields[11]), int(fields[5]), int(fields[9])
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self._read()
            if sample is not None:
                self.samples.append((time.perf_counter(), *sample))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> DiskSampler:
        if self.device is not None:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, float] | None:
        if len(self.samples) < 2:
            return None
        seconds = self.samples[-1][0] - self.samples[0][0]
        in_flight = [s[1] for s in self.samples]
        return {
            "idle_fraction": round(sum(1 for n in in_flight if n == 0) / len(in_flight), 3),
            "mean_in_flight": round(statistics.mean(in_flight), 2),
            "read_gb_per_s": round(
                (self.samples[-1][2] - self.samples[0][2]) * 512 / seconds / 1e9, 3
            ),
            "write_gb_per_s": round(
                (self.samples[-1][3] - self.samples[0][3]) * 512 / seconds / 1e9, 3
            ),
        }


def disk_device(path: Path) -> str | None:
    """The /proc/diskstats name of the block device holding ``path`` (vda, nvme0n1p1, ...)."""
    try:
        done = subprocess.run(["df", "--output=source", str(path)], capture_output=True, text=True)
        source = done.stdout.split()[-1]
    except (OSError, IndexError):
        return None
    return Path(source).name if source.startswith("/dev/") else None


def _runs_ok(command: list[str]) -> bool:
    try:
        done = subprocess.run(command, capture_output=True, timeout=120, env=_tool_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _tool_env() -> dict[str, str]:
    return os.environ | OFFLINE_ENV


def _dist_version(python: Path, dist: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def resolve_tools(
    args: argparse.Namespace,
    config: Path,
    work: Path,
    inputs: list[Path],
    out_bytes: int,
    models: list[list[Path]] | None = None,
) -> list[ToolRuns]:
    """The ToolRuns to time, in --tools order; a tool that is not installed is skipped."""
    tools = []
    models = models or [inputs]
    for name in args.tools:
        out = work / f"out-{name}"
        if name == "shardmerge":
            binary = Path(args.shardmerge_bin)
            if not binary.exists() or not _runs_ok([str(binary), "run", "--help"]):
                print(f"skipping shardmerge: `{binary} run --help` does not work", file=sys.stderr)
                continue
            cmd = [str(binary), "run", str(config), "--out", str(out), "--overwrite", "--quiet"]
            version = f"{_dist_version(binary.parent / 'python', 'shardmerge')} ({_git_state()})"
            _compile_bytecode(binary.parent / "python", "shardmerge")
        elif name == "baseline":
            # Another build of shardmerge, timed in the same alternation (an A/B of a change):
            # a checkout of the earlier commit, run with this environment's python.
            if args.baseline_src is None:
                print("skipping baseline: --baseline-src is not given", file=sys.stderr)
                continue
            src = Path(args.baseline_src).resolve()
            python = Path(args.shardmerge_bin).parent / "python"
            # -P: without it, `-m` puts the current directory first on sys.path, and run from
            # a checkout's root the baseline was that checkout's code, not --baseline-src's.
            cmd = ["env", f"PYTHONPATH={src}", str(python), "-P", "-m", "shardmerge.cli", "run"]
            cmd += [str(config), "--out", str(out), "--overwrite", "--quiet"]
            head = _first_line(["git", "-C", str(src), "rev-parse", "--short", "HEAD"])
            version = f"shardmerge at {src} (git {head})"
            code = "import compileall; compileall.compile_dir('shardmerge', quiet=1)"
            subprocess.run([str(python), "-c", code], cwd=src, check=True)
        elif name == "mergekit":
            binary = Path(args.mergekit_bin)
            if not binary.exists():
                print(
                    f"skipping mergekit: {binary} not found "
                    "(bash benchmarks/setup_mergekit.sh installs it)",
                    file=sys.stderr,
                )
                continue
            cmd = [str(binary), str(config), str(out), "--allow-crimes"]
            version = _dist_version(binary.parent / "python", "mergekit")
        elif name == "read":
            cmd = concurrent_read_command(models)
            version = _first_line(["cat", "--version"])
        elif name == "write":
            cmd = direct_write_command(out, out_bytes)
            version = _first_line(["dd", "--version"])
        elif name == "mixed":
            cmd = mixed_io_command(models, out, out_bytes)
            version = _first_line(["dd", "--version"])
        else:
            cmd = floor_command(inputs, out, out_bytes)
            version = _first_line(["dd", "--version"])
        if args.cold:
            cmd = with_sync(cmd)
        tools.append(ToolRuns(name=name, command=cmd, version=version))
    return tools


def _compile_bytecode(python: Path, package: str) -> None:
    """Write the package's .pyc files, as pip does when it installs a wheel (mergekit's are).

    An editable checkout gets them on first import, except under PYTHONDONTWRITEBYTECODE=1 (set
    on our dev machines): every timed run then compiled shardmerge's modules again, ~0.03 s."""
    code = f"import {package}, compileall; compileall.compile_dir({package}.__path__[0], quiet=1)"
    subprocess.run([str(python), "-c", code], check=True)


def _git_state() -> str:
    """The working tree's commit, flagged when it has uncommitted changes (shardmerge moves fast)."""
    head = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    changes = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "shardmerge"])
    return f"git {head}" + (" + uncommitted changes" if changes else "")


def _first_line(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "?"


def warm_cache(paths: list[Path]) -> None:
    """Read every input once so that each timed run starts from the same warm page cache."""
    buffer = bytearray(READ_BUFFER_BYTES)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


@dataclass(frozen=True)
class RunResult:
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    cpu_busy_before: float
    others_cpu_s: float
    disk: dict[str, float] | None = None
    own_cpu_s: float = 0.0  # the command's user + sys seconds (/usr/bin/time -v)


def time_once(
    tool: ToolRuns,
    out_dir: Path,
    log_path: Path,
    inputs: list[Path],
    quiet_wait_s: float,
    cold_device: str | None = None,
    cold: bool = False,
) -> RunResult:
    """Run the tool once under /usr/bin/time -v: empty output, flushed disk, then warm inputs
    (or, ``cold``, an empty page cache)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    # Flush the previous run's dirty pages so that its writeback does not land in this run.
    subprocess.run(["sync"], check=True)
    if cold:
        drop_caches()
    else:
        # Re-read the inputs: the kernel may have evicted them since the last run (proactive
        # reclaim pages out page cache left untouched for about a minute on these VMs).
        warm_cache(inputs)
    cpu_busy_before = wait_for_quiet(quiet_wait_s)
    if cold:
        drop_caches()  # what the wait may have let back in (nothing, normally)
    stats_path = log_path.with_suffix(".time")
    command = [GNU_TIME, "-v", "-o", str(stats_path), *tool.command]
    busy_start, _ = _cpu_jiffies()
    with open(log_path, "wb") as log, DiskSampler(cold_device if cold else None) as disk:
        start = time.perf_counter()
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_tool_env())
        wall_s = time.perf_counter() - start
    busy_end, _ = _cpu_jiffies()
    stats = stats_path.read_text()
    peak_rss_kib = _time_v_field(stats, "Maximum resident set size (kbytes)")
    own_cpu_s = _time_v_field(stats, "User time (seconds)") + _time_v_field(
        stats, "System time (seconds)"
    )
    # CPU time the machine spent on anything but this command (others' work, writeback threads).
    others_cpu_s = max(0.0, (busy_end - busy_start) / CLOCK_TICKS_PER_S - own_cpu_s)
    return RunResult(
        wall_s=wall_s,
        peak_rss_bytes=int(peak_rss_kib * 1024),
        returncode=rc.returncode,
        cpu_busy_before=cpu_busy_before,
        others_cpu_s=round(others_cpu_s, 2),
        disk=disk.summary(),
        own_cpu_s=round(own_cpu_s, 2),
    )


def _time_v_field(stats: str, label: str) -> float:
    match = re.search(re.escape(label) + r": ([\d.]+)", stats)
    return float(match.group(1)) if match else float("nan")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal (guest time is already in user).
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs' time spent busy over the next `seconds` (others' work shows here)."""
    busy0, total0 = _cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = _cpu_jiffies()
    return round((busy1 - busy0) / max(1, total1 - total0), 3)


def wait_for_quiet(max_wait_s: float, quiet_seconds: int = 3) -> float:
    """Wait until the CPUs have been idle for quiet_seconds in a row, or max_wait_s passed.

    Returns the busy fraction of the last second; above BUSY_WARNING means it gave up waiting.
    """
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    while True:
        busy = cpu_busy_fraction()
        quiet = quiet + 1 if busy <= BUSY_WARNING else 0
        if quiet >= quiet_seconds or time.monotonic() > deadline:
            return busy


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def machine_info() -> dict[str, object]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "cpu_busy_at_start": cpu_busy_fraction(),
    }


def summarize(tools: list[ToolRuns], input_bytes: int) -> dict[str, dict[str, object]]:
    """Per tool: median wall, input GB/s, max peak RSS and the pair-by-pair median ratios."""
    by_name = {t.name: t for t in tools}

    def ratio_to(tool: ToolRuns, ref_name: str) -> float | None:
        ref = by_name.get(ref_name)
        if ref is None or not ref.walls_s or not tool.walls_s:
            return None
        pairs = [w / r for w, r in zip(tool.walls_s, ref.walls_s, strict=False)]
        return statistics.median(pairs)

    def ratio_to_read_write(tool: ToolRuns) -> float | None:
        # The disk's own limit, repeat by repeat: reading both inputs at once, then writing.
        read, write = by_name.get("read"), by_name.get("write")
        if read is None or write is None or not tool.walls_s:
            return None
        refs = [r + w for r, w in zip(read.walls_s, write.walls_s, strict=False)]
        pairs = [w / r for w, r in zip(tool.walls_s, refs, strict=False)]
        return statistics.median(pairs) if pairs else None

    summary = {}
    for t in tools:
        median_s = statistics.median(t.walls_s) if t.walls_s else None
        summary[t.name] = {
            "median_wall_s": median_s,
            "input_gb_per_s": input_bytes / median_s / 1e9 if median_s else None,
            "peak_rss_bytes": max(t.peak_rss_bytes) if t.peak_rss_bytes else None,
            "ratio_to_shardmerge": ratio_to(t, "shardmerge"),
            "ratio_to_floor": ratio_to(t, "floor"),
            "ratio_to_read_write": ratio_to_read_write(t),
            "ratio_to_mixed": ratio_to(t, "mixed"),
        }
    return summary


def markdown_table(tools: list[ToolRuns], summary: dict[str, dict[str, object]]) -> str:
    def fmt(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        "| tool | median wall (s) | runs (s) | input GB/s | peak RSS (GB) "
        "| wall / shardmerge | wall / floor | wall / (read + write) | wall / mixed |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tools:
        s = summary[t.name]
        rss = s["peak_rss_bytes"]
        runs = ", ".join(f"{w:.2f}" for w in t.walls_s) or "-"
        name = t.name if t.failed is None else f"{t.name} (FAILED)"
        rows.append(
            f"| {name} | {fmt(s['median_wall_s'], '.2f')} | {runs} "
            f"| {fmt(s['input_gb_per_s'], '.2f')} "
            f"| {fmt(None if rss is None else rss / 1e9, '.2f')} "
            f"| {fmt(s['ratio_to_shardmerge'], '.2f')} | {fmt(s['ratio_to_floor'], '.2f')} "
            f"| {fmt(s['ratio_to_read_write'], '.2f')} | {fmt(s['ratio_to_mixed'], '.2f')} |"
        )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="medium")
    parser.add_argument(
        "--tools",
        type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
        default=list(DEFAULT_TOOLS),
        help="comma-separated, run in this order each repeat (default shardmerge,mergekit,floor;"
        " also: read = both inputs read at once, write = the output's size written with O_DIRECT,"
        " mixed = both at the same time)",
    )
    parser.add_argument(
        "--baseline-src",
        help="tool `baseline`: a checkout of another shardmerge commit, for an A/B in one run",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="empty the page cache before each run (root), and count each run until `sync`",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shardmerge-bin", default=str(DEFAULT_SHARDMERGE))
    parser.add_argument("--mergekit-bin", default=str(DEFAULT_MERGEKIT))
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, help="default DATA_DIR/results-SIZE.json")
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=120,
        help="before each run, wait up to this long for 3 idle seconds (default 120)",
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged models")
    parser.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip comparing shardmerge's and mergekit's outputs (7b: minutes, and 27 GB of disk)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [t for t in args.tools if t not in TOOLS]
    if unknown or not args.tools or args.repeats < 1:
        print(f"run: --tools takes {','.join(TOOLS)}; --repeats >= 1", file=sys.stderr)
        return 2
    if not Path(GNU_TIME).exists():
        print(f"run: {GNU_TIME} is missing (apt-get install time)", file=sys.stderr)
        return 2
    if args.cold and (why := can_drop_caches()) is not None:
        print(f"run: {why}", file=sys.stderr)
        return 2

    spec: PairSpec = PRESETS[args.size]
    work = (args.data_dir / args.size).resolve()
    if not (work / "pair.json").exists():
        needed = int(3.1 * _model_bytes(spec))  # two inputs and one output, a little more
        free = shutil.disk_usage(work.parent if work.parent.exists() else args.data_dir).free
        if free < needed:
            print(
                f"run: the {args.size} pair and its output need {needed / 1e9:.1f} GB of disk; "
                f"{free / 1e9:.1f} GB are free",
                file=sys.stderr,
            )
            return 2
    pair = prepare_pair(spec, work)
    config, inputs, input_bytes = pair.config, pair.inputs, pair.input_bytes
    tools = resolve_tools(args, config, work, inputs, pair.out_bytes, pair.models)
    device = disk_device(work) if args.cold else None
    if not tools:
        print("run: no tool to run", file=sys.stderr)
        return 1
    machine = machine_info()
    if machine["cpu_busy_at_start"] > BUSY_WARNING:
        print(
            f"warning: the CPUs are {machine['cpu_busy_at_start']:.0%} busy before any run: "
            "something else is running, timings will be noisy",
            file=sys.stderr,
        )
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    for repeat in range(args.repeats):
        for tool in tools:
            if tool.failed:
                continue
            log_path = logs / f"{tool.name}-{repeat + 1}.log"
            out_dir = work / f"out-{tool.name}"
            run = time_once(
                tool, out_dir, log_path, inputs, args.quiet_wait_s, device, cold=args.cold
            )
            if run.returncode != 0:
                tool.failed = f"exit {run.returncode} in repeat {repeat + 1}, log {log_path}"
                print(f"{tool.name} FAILED ({tool.failed}):\n{_tail(log_path)}", file=sys.stderr)
                continue
            compared = args.compare and tool.name in ("shardmerge", "mergekit")
            if not args.keep_outputs and (not compared or repeat + 1 < args.repeats):
                # Only the last outputs of the compared tools are kept: a 7b merge's outputs
                # would not all fit on the disk.
                shutil.rmtree(out_dir, ignore_errors=True)
            tool.walls_s.append(run.wall_s)
            tool.peak_rss_bytes.append(run.peak_rss_bytes)
            tool.cpu_busy_before.append(run.cpu_busy_before)
            tool.others_cpu_s.append(run.others_cpu_s)
            tool.disk.append(run.disk)
            disk = "" if run.disk is None else f"; disk: {run.disk}"
            print(
                f"repeat {repeat + 1}/{args.repeats} {tool.name}: {run.wall_s:.2f} s, "
                f"peak RSS {run.peak_rss_bytes / 1e9:.2f} GB (CPU busy before: "
                f"{run.cpu_busy_before:.0%}, others' CPU during: {run.others_cpu_s:.1f} s){disk}",
                file=sys.stderr,
            )

    ran = {t.name for t in tools if t.walls_s and not t.failed}
    comparison = None
    if args.compare and {"shardmerge", "mergekit"} <= ran:
        print("comparing shardmerge and mergekit outputs ...", file=sys.stderr)
        comparison = compare_checkpoints(work / "out-shardmerge", work / "out-mergekit")

    summary = summarize(tools, input_bytes)
    table = markdown_table(tools, summary)
    print(f"## {args.size}: SLERP of two {input_bytes / 2e9:.2f} GB bf16 checkpoints\n")
    cache = (
        "cold: page cache dropped before each run, each timed until `sync`"
        if args.cold
        else "warm page cache"
    )
    print(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_gib']} GiB RAM, "
        f"Linux {machine['kernel']}; {cache}; {args.repeats} alternating repeats; "
        f"inputs {input_bytes / 1e9:.2f} GB ({len(inputs)} shards).\n"
    )
    print(table)
    for t in tools:
        print(f"\n- {t.name}: {t.version or '?'}" + (f" - FAILED: {t.failed}" if t.failed else ""))
    if args.cold:
        print("\nThe disk during each run (/proc/diskstats every 50 ms: share of samples with no")
        print("request in flight, mean requests in flight, read and write GB/s):\n")
        for t in tools:
            for i, disk in enumerate(t.disk):
                if disk is not None:
                    print(
                        f"- {t.name} #{i + 1}: idle {disk['idle_fraction']:.0%}, "
                        f"{disk['mean_in_flight']:.1f} in flight, read "
                        f"{disk['read_gb_per_s']:.2f} GB/s, write {disk['write_gb_per_s']:.2f} GB/s"
                    )
    noisy = [
        f"{t.name} #{i + 1}"
        for t in tools
        for i, (before, others, wall) in enumerate(
            zip(t.cpu_busy_before, t.others_cpu_s, t.walls_s, strict=True)
        )
        if before > BUSY_WARNING or others > OTHERS_CPU_WARNING * wall + OTHERS_CPU_SLACK_S
    ]
    if noisy:
        print(f"\nWARNING: other processes used the CPUs in runs {', '.join(noisy)}: noisy.")
    if comparison is not None:
        print("\n```\n" + format_comparison(comparison, "shardmerge", "mergekit") + "\n```")

    json_path = (
        args.json or args.data_dir / f"results-{args.size}{'-cold' if args.cold else ''}.json"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "size": args.size,
        "spec": asdict(spec),
        "machine": machine,
        "repeats": args.repeats,
        "cold": args.cold,
        "input_bytes": input_bytes,
        "config_yaml": config.read_text(),
        "tools": {t.name: asdict(t) | summary[t.name] for t in tools},
        "comparison": None if comparison is None else comparison.to_dict(),
        "markdown": table,
    }
    json_path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {json_path}", file=sys.stderr)

    if not args.keep_outputs:
        for tool in tools:
            shutil.rmtree(work / f"out-{tool.name}", ignore_errors=True)
    failed = any(t.failed for t in tools) or (comparison is not None and not comparison.ok)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
