"""benchmarks/run.py's cold-disk pieces: the component commands and the disk sampler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import run  # noqa: E402


def test_concurrent_read_reads_every_file_and_fails_on_a_missing_one(tmp_path):
    files = []
    for name in ("a1", "a2", "b1"):
        (tmp_path / name).write_bytes(b"x" * 1000)
        files.append(tmp_path / name)
    done = subprocess.run(run.concurrent_read_command([files[:2], files[2:]]), capture_output=True)
    assert done.returncode == 0, done.stderr
    missing = run.concurrent_read_command([[tmp_path / "nope"], files[2:]])
    assert subprocess.run(missing, capture_output=True).returncode != 0


def test_direct_write_writes_the_output_size(tmp_path):
    command = run.direct_write_command(tmp_path / "out", 3 * 4096)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and "Invalid argument" in done.stderr:  # tmpfs refuses O_DIRECT
        return
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "write.bin").stat().st_size == 3 * 4096


def test_with_sync_keeps_the_exit_status_and_arguments(tmp_path):
    marker = tmp_path / "it ran"
    assert subprocess.run(run.with_sync(["touch", str(marker)])).returncode == 0
    assert marker.exists()  # an argument with a space passed through intact
    assert subprocess.run(run.with_sync(["false"])).returncode == 1


def test_disk_sampler_summarises_in_flight_and_throughput():
    sampler = run.DiskSampler("vda")
    sampler.samples = [(0.0, 0, 0, 0), (0.5, 2, 1_000_000, 0), (1.0, 4, 2_000_000, 1_000_000)]
    assert sampler.summary() == {
        "idle_fraction": 0.333,
        "mean_in_flight": 2.0,
        "read_gb_per_s": 1.024,  # 2e6 sectors of 512 bytes in 1 s
        "write_gb_per_s": 0.512,
    }
    assert run.DiskSampler(None).summary() is None


def test_read_write_reference_is_taken_repeat_by_repeat():
    tools = [
        run.ToolRuns("shardmerge", [], walls_s=[30.0, 33.0]),
        run.ToolRuns("read", [], walls_s=[20.0, 21.0]),
        run.ToolRuns("write", [], walls_s=[5.0, 9.0]),
    ]
    summary = run.summarize(tools, input_bytes=10**9)
    assert summary["shardmerge"]["ratio_to_read_write"] == (30 / 25 + 33 / 30) / 2


def test_mixed_io_reads_every_input_and_writes_the_output_size(tmp_path):
    files = []
    for name in ("a1", "b1"):
        (tmp_path / name).write_bytes(b"x" * 1000)
        files.append(tmp_path / name)
    command = run.mixed_io_command([files[:1], files[1:]], tmp_path / "out", 3 * 4096)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and "Invalid argument" in done.stderr:  # tmpfs refuses O_DIRECT
        return
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "mixed.bin").stat().st_size == 3 * 4096
    missing = run.mixed_io_command([[tmp_path / "nope"], files[1:]], tmp_path / "out", 4096)
    assert subprocess.run(missing, capture_output=True).returncode != 0


def test_mixed_reference_is_taken_repeat_by_repeat():
    tools = [
        run.ToolRuns("shardmerge", [], walls_s=[30.0, 33.0]),
        run.ToolRuns("mixed", [], walls_s=[25.0, 30.0]),
    ]
    summary = run.summarize(tools, input_bytes=10**9)
    assert summary["shardmerge"]["ratio_to_mixed"] == (30 / 25 + 33 / 30) / 2
    assert "| wall / mixed |" in run.markdown_table(tools, summary)
