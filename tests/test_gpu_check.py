"""benchmarks/gpu_check.sh: its --quick mode runs here (CPU only), so the GPU check never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_probe  # noqa: E402
import run  # noqa: E402
from make_pair import PRESETS, write_pair  # noqa: E402


@pytest.mark.slow
def test_quick_mode_runs_every_step_and_writes_its_table(tmp_path):
    results = tmp_path / "results"
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--quick", str(results),
         "--data-dir", str(tmp_path / "data"), "--devices", "cpu", "--methods", "ties"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (results / "table.md").read_text()
    assert table == done.stdout
    assert "| tiny | cpu |" in table and "| tiny | floor-direct |" in table
    data = json.loads((results / "results.json").read_text())
    assert data["quick"] and data["failures"] == []
    assert data["tests"]["exit_code"] == 0  # pytest -m gpu ran (its tests skip without CUDA)
    (tiny,) = data["sizes"]
    cpu = tiny["tools"]["cpu"]
    assert len(cpu["walls_s"]) == 1 and cpu["walls_s"][0] > 0
    assert 0 < cpu["peak_rss_bytes"][0] < 2e9
    phases = cpu["process_stats"][0]["phases_s"]
    assert phases["import_torch"] >= 0 and phases["merge_shards"] > 0
    exact = tiny["checks"]["exact_copies"]
    assert exact["tensors"] > 0 and exact["problems"] == []
    roles = tiny["profile"]["host"]["roles"]
    assert roles["read"]["calls"] > 0 and roles["write"]["calls"] > 0
    assert roles["compute"]["busy_s"] > 0
    assert not (tmp_path / "data" / "tiny" / "out-cpu").exists()  # outputs removed
    # --methods: the N-model method on the family, with the family's own direct floor.
    assert "| tiny | cpu ties |" in table and "| tiny | floor-direct family |" in table
    ties = tiny["tools"]["cpu ties"]
    assert len(ties["walls_s"]) == 1 and ties["failed"] is None
    assert not (tmp_path / "data" / "tiny" / "out-cpu ties").exists()


def test_gpu_check_refuses_an_unknown_size(tmp_path):
    assert gpu_check.main([str(tmp_path / "r"), "--sizes", "huge"]) == 2


def test_exact_copy_check_finds_a_changed_byte(tmp_path):
    from shardmerge.pipeline import prepare, run_merge
    from shardmerge.recipe import load_recipe

    spec = PRESETS["tiny"]
    write_pair(spec, tmp_path)
    config = tmp_path / "slerp.yml"
    config.write_text(run.slerp_config_yaml(tmp_path / "a", tmp_path / "b", spec.layers))
    out = tmp_path / "out"
    run_merge(prepare(load_recipe(config)), out=out, quiet=True, device="cpu")
    problems, checked = gpu_check.check_exact_copies(config, {"cpu": out})
    assert checked > 0 and problems == []

    # Flip one byte inside a tensor that t = 0 copies from model A.
    plan = prepare(load_recipe(config)).plan
    task = next(t for t in plan.tasks if t.t == 0.0 and t.is_float)
    shard = next(s for s in plan.shards if task in s.tasks)
    path = out / shard.filename
    data = bytearray(path.read_bytes())
    data[len(shard.header) + task.out_begin + 1] ^= 0x01
    path.write_bytes(bytes(data))
    problems, _ = gpu_check.check_exact_copies(config, {"cpu": out})
    assert problems == [f"cpu: {task.name} (t = 0) differs from model a"]


def test_device_summary_measures_overlap_of_copies_and_kernels():
    ms = 1000.0  # the trace's times are in µs
    events = [
        ("Memcpy HtoD (Pinned -> Device)", 0.0, 100 * ms),
        ("Memcpy HtoD (Pinned -> Device)", 50 * ms, 150 * ms),  # overlaps the first copy
        ("void at::native::kernel<float>", 120 * ms, 200 * ms),  # 30 ms during the copies
        ("Memcpy DtoH (Device -> Pinned)", 300 * ms, 400 * ms),
        ("Memset (Device)", 400 * ms, 410 * ms),
    ]
    summary = gpu_probe.device_summary(events, wall_us=1000 * ms)
    assert summary["wall_ms"] == 1000.0
    assert summary["h2d"] == {
        "count": 2, "sum_ms": 200.0, "busy_ms": 150.0, "overlapping_kernels_ms": 30.0
    }  # fmt: skip
    assert summary["kernel"] == {"count": 1, "sum_ms": 80.0, "busy_ms": 80.0}
    assert summary["d2h"]["overlapping_kernels_ms"] == 0.0
    assert summary["memset"]["count"] == 1
    assert summary["device_busy_ms"] == 310.0  # 0-200 and 300-410
    assert summary["first_to_last_ms"] == 410.0
    assert gpu_probe.device_category("Memcpy DtoD (Device -> Device)") == "d2d"


def test_direct_floor_writes_with_o_direct(tmp_path):
    command = gpu_check.direct_floor_command([tmp_path / "x"], tmp_path / "o", 100)
    assert "oflag=direct" in command[-1] and "iflag=count_bytes" in command[-1]
