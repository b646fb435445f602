"""One merge, single-process and under ``torchrun --nproc-per-node N``, side by side.

    .venv/bin/python benchmarks/distributed_row.py                 # medium pair, 2 ranks, CPU
    .venv/bin/python benchmarks/distributed_row.py --preset tiny --repeats 3
    .venv/bin/python benchmarks/distributed_row.py --device auto   # GPUs when present

Generates the pair with make_pair.py if needed, writes a SLERP recipe (every t strictly between
0 and 1, so every tensor reads both inputs), then times the merge in one process and under
torchrun, alternating, from a warm page cache. The single run is ``prepare`` + ``run_merge``
in a fresh interpreter, what ``shardmerge run`` does, so that it can report its bytes read.
Reports wall seconds, the input bytes each rank read (its ``rank R: read N input bytes`` line;
their sum must equal the single run's) next to the input tensor bytes of the rank's shards in
the plan (the engine reads tensors above its resident size twice, so the reads can be more),
and whether the two output folders are byte-identical, file by file. A markdown row goes to
stdout; ``--json`` also writes the figures to a file.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_pair import DATA_DIR, PRESETS, ensure_pair, parse_size_bytes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
READ_LINE = re.compile(r"^rank (\d+): read (\d+) input bytes$", re.MULTILINE)
SINGLE = """\
import sys
from pathlib import Path
from shardmerge.pipeline import prepare, run_merge
from shardmerge.recipe import load_recipe
recipe, out, device = sys.argv[1:]
result = run_merge(prepare(load_recipe(Path(recipe))), out=Path(out), device=device, quiet=True)
print(f"rank 0: read {result.bytes_read} input bytes", file=sys.stderr)
"""
RECIPE = """\
models:
  a: {a}
  b: {b}
t:
  default: 0.5
  non_layer: 0.5
  rules:
    - match: self_attn
      gradient: [0.1, 0.5, 0.3, 0.7, 0.9]
    - match: mlp
      gradient: [0.9, 0.5, 0.7, 0.3, 0.1]
output:
  shard_size: {shard_size}
"""


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run ``command``; returns (wall seconds, stderr). Exits on failure."""
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-4000:]}")
    return wall, proc.stderr


def identical(left: Path, right: Path) -> tuple[bool, str]:
    """Every file of both folders, byte for byte; returns (same, first difference)."""
    names_l = sorted(p.relative_to(left).as_posix() for p in left.rglob("*") if p.is_file())
    names_r = sorted(p.relative_to(right).as_posix() for p in right.rglob("*") if p.is_file())
    if names_l != names_r:
        return False, f"different files: {sorted(set(names_l) ^ set(names_r))}"
    for name in names_l:
        if not filecmp.cmp(left / name, right / name, shallow=False):
            return False, f"{name} differs"
    return True, f"{len(names_l)} files"


def planned_bytes_per_rank(recipe: Path, ranks: int) -> list[int]:
    """Input bytes each rank's shards need, from the plan and the split (headers only)."""
    sys.path.insert(0, str(REPO))
    from shardmerge.distributed import split_shards
    from shardmerge.pipeline import prepare
    from shardmerge.recipe import load_recipe

    plan = prepare(load_recipe(recipe)).plan
    return [
        sum(t.a.nbytes + t.b.nbytes for i in ids for t in plan.shards[i].tasks)
        for ids in split_shards(plan, ranks)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun --nproc-per-node")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | auto | cuda (both runs)")
    parser.add_argument(
        "--shard-size", type=parse_size_bytes, help="output shard size (default: model / 8)"
    )
    parser.add_argument("--work", type=Path, help="outputs go here (default .data/dist-PRESET)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    spec = PRESETS[args.preset]
    pair_dir = DATA_DIR / args.preset
    ensure_pair(spec, pair_dir)
    work = args.work or DATA_DIR / f"dist-{args.preset}"
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = sum(p.stat().st_size for p in (pair_dir / "a").glob("*.safetensors"))
    shard_size = args.shard_size or max(1, model_bytes // 8)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(a=pair_dir / "a", b=pair_dir / "b", shard_size=shard_size))
    planned = planned_bytes_per_rank(recipe, args.ranks)

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    single_out, multi_out = work / "single", work / f"ranks{args.ranks}"
    single_cmd = [sys.executable, "-c", SINGLE, str(recipe), str(single_out), args.device]
    multi_cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={args.ranks}"]
    multi_cmd += ["-m", "shardmerge.cli", "run", str(recipe), "--out", str(multi_out)]
    multi_cmd += ["--device", args.device, "--quiet"]

    for path in pair_dir.rglob("*.safetensors"):  # warm the page cache
        with path.open("rb") as fh:
            while fh.read(1 << 24):
                pass
    walls: dict[str, list[float]] = {"single": [], "multi": []}
    reads: dict[str, dict[int, int]] = {}
    for repeat in range(args.repeats):
        order = [("single", single_cmd, single_out), ("multi", multi_cmd, multi_out)]
        for name, cmd, out in order if repeat % 2 == 0 else order[::-1]:
            shutil.rmtree(out, ignore_errors=True)
            wall, stderr = run_timed(cmd, env)
            print(f"  {name}: {wall:.2f} s", file=sys.stderr)
            walls[name].append(wall)
            reads[name] = {int(r): int(n) for r, n in READ_LINE.findall(stderr)}
    same, detail = identical(single_out, multi_out)
    per_rank = [reads["multi"].get(r, -1) for r in range(args.ranks)]
    single_read = reads["single"].get(0, -1)
    figures = {
        "preset": args.preset,
        "device": args.device,
        "ranks": args.ranks,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "output_shard_size_bytes": shard_size,
        "single_wall_s": walls["single"],
        "ranks_wall_s": walls["multi"],
        "single_bytes_read": single_read,
        "bytes_read_per_rank": per_rank,
        "plan_tensor_bytes_per_rank": planned,
        "ranks_sum_equals_single": sum(per_rank) == single_read,
        "byte_identical": same,
        "comparison": detail,
    }
    single_med = statistics.median(walls["single"])
    multi_med = statistics.median(walls["multi"])
    ok = same and sum(per_rank) == single_read
    print(
        f"| pair | device | CPUs | single (s) | {args.ranks} ranks (s) | speed-up "
        "| bytes read: single | per rank (plan) | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ranks_text = " / ".join(f"{n:,} ({p:,})" for n, p in zip(per_rank, planned, strict=True))
    print(
        f"| {args.preset} | {args.device} | {os.cpu_count()} | {single_med:.2f} | "
        f"{multi_med:.2f} | {single_med / multi_med:.2f}x | {single_read:,} | {ranks_text} | "
        f"{'yes' if same else 'NO: ' + detail} |"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
