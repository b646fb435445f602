"""Distributed runs, started as a user would (torchrun, accelerate launch), on CPU with gloo.

One small checkpoint pair and its single-process merge are shared by the module; each launch
costs a few seconds of start-up, so the launches are few and each checks several things.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardmerge import distributed
from shardmerge.cli import main
from shardmerge.errors import InputError
from shardmerge.pipeline import PreparedMerge, prepare, run_merge
from shardmerge.plan import MergePlan
from shardmerge.recipe import load_recipe
from tests.conftest import folder_files, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LAYERS = 6
RECIPE = """\
models:
  a: {a}
  b: {b}
t:
  default: 0.3
  non_layer: 0.6
  rules:
    - match: self_attn
      gradient: [0.1, 0.9]
output:
  shard_size: 2KB
"""
GROUP_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
READ_LINE = re.compile(r"^rank (\d+): read (\d+) input bytes$", re.MULTILINE)

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(64, 16)}
    for i in range(LAYERS):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = rand(16, 16)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = rand(32, 16)
        t[f"model.layers.{i}.input_layernorm.weight"] = rand(16)
    t["model.norm.weight"] = rand(16)
    t["lm_head.weight"] = rand(64, 16)
    t["bn.num_batches_tracked"] = torch.tensor(7 + seed, dtype=torch.int64)
    return t


@dataclass(frozen=True)
class Pair:
    root: Path
    recipe: Path  # no output dir in it: the card (which quotes the recipe) is the same for all
    prepared: PreparedMerge
    reference: dict[str, bytes]  # every file of the single-process output
    bytes_read: int  # by the single-process run


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("dist")
    a, b = _tensors(0), _tensors(1)
    names = list(a)
    config = {"model_type": "llama", "torch_dtype": "bfloat16"}
    write_checkpoint(root / "a", a, [names[:9], names[9:15], names[15:]], config)
    write_checkpoint(root / "b", b, [names[:12], names[12:]], config, {"tokenizer.json": "{}"})
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(a=root / "a", b=root / "b"))
    prepared = prepare(load_recipe(recipe))
    assert len(prepared.plan.shards) >= 5  # so that three ranks all get work
    # Named as the tests' outputs are: the model card's title is the folder's name.
    result = run_merge(prepared, out=root / "out", quiet=True, device="cpu")
    return Pair(root, recipe, prepared, folder_files(root / "out"), result.bytes_read)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GROUP_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(
    launcher: str, n: int, recipe: Path, out: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``shardmerge run`` under a launcher, the way the docs show it."""
    run = ["run", str(recipe), "--out", str(out), "--device", "cpu", "--quiet", *args]
    if launcher == "env":  # one process per rank, variables set by hand (a Kubernetes job)
        group = {"WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "shardmerge.cli", *run],
                cwd=out.parent,
                env=_env(**group, RANK=str(rank), **env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(n)
        ]
        try:
            outputs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        code = max(abs(p.returncode) for p in procs)
        return subprocess.CompletedProcess(
            run, code, "".join(o for o, _ in outputs), "".join(e for _, e in outputs)
        )
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={n}", "-m"]
        cmd += ["shardmerge", *run]  # the README's form
    elif launcher == "torchrun-script":  # the console script, as installed
        script = shutil.which("shardmerge", path=str(BIN))
        if script is None:
            pytest.skip("the shardmerge console script is not installed")
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={n}", "--no-python"]
        cmd += [script, *run]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", f"--num_processes={n}"]
        cmd += ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
        cmd += [f"--main_process_port={_free_port()}", "-m", "shardmerge", *run]
    return subprocess.run(
        cmd, cwd=out.parent, env=_env(**env), capture_output=True, text=True, timeout=120
    )


def _bytes_per_rank(stderr: str) -> dict[int, int]:
    return {int(rank): int(n) for rank, n in READ_LINE.findall(stderr)}


def _input_bytes(plan: MergePlan, shard_ids: list[int]) -> int:
    # Every t is strictly between 0 and 1: both inputs of every tensor are read, once each.
    return sum(t.a.nbytes + t.b.nbytes for i in shard_ids for t in plan.shards[i].tasks)


def _fake_plan(sizes: list[int]) -> Any:
    return SimpleNamespace(shards=[SimpleNamespace(file_bytes=n) for n in sizes])


def _best_contiguous_max(sizes: list[int], n: int) -> int:
    """Brute force: the smallest largest-group sum over every split into <= n runs."""
    best = sum(sizes)
    for k in range(min(n, len(sizes))):
        for cuts in combinations(range(1, len(sizes)), k):
            bounds = [0, *cuts, len(sizes)]
            best = min(
                best, max(sum(sizes[s:e]) for s, e in zip(bounds[:-1], bounds[1:], strict=True))
            )
    return best


@pytest.mark.parametrize(
    "sizes",
    [[10, 9, 8, 7, 6, 5, 4], [5, 5, 5, 5, 1], [1, 1, 1, 1, 1, 1], [100, 1, 1, 1, 1, 90, 2, 3]],
)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_split_shards_contiguous_balanced_every_rank_busy(sizes, n):
    split = distributed.split_shards(_fake_plan(sizes), n)
    assert len(split) == n
    assert [i for ids in split for i in ids] == list(range(len(sizes)))  # each once, in order
    loads = [sum(sizes[i] for i in ids) for ids in split]
    assert max(loads) == _best_contiguous_max(sizes, n)
    assert all(split)  # more shards than ranks: none idle
    assert distributed.split_shards(_fake_plan(sizes), n) == split  # deterministic


def test_split_shards_more_ranks_than_shards():
    assert distributed.split_shards(_fake_plan([3, 4]), 4) == [[0], [1], [], []]
    assert distributed.split_shards(_fake_plan([]), 2) == [[], []]
    with pytest.raises(ValueError):
        distributed.split_shards(_fake_plan([1]), 0)


def test_active_follows_world_size(monkeypatch):
    for name in GROUP_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.active() and distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.active()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.active() and not distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="WORLD_SIZE"):
        distributed.active()


def test_world_size_without_rendezvous_is_a_clear_error(pair, tmp_path, monkeypatch, capsys):
    # A job array / indexed job starting ranks by hand, without torchrun's variables.
    for name in GROUP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    out = tmp_path / "out"
    code = main(["run", str(pair.recipe), "--out", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "MASTER_ADDR and MASTER_PORT are not set" in err and "torchrun" in err
    assert not out.exists()


def test_plan_lists_each_rank_and_its_shards(pair, capsys):
    assert main(["plan", str(pair.recipe), "--num-processes", "3"]) == 0
    text = capsys.readouterr().out
    plan = pair.prepared.plan
    for rank, ids in enumerate(distributed.split_shards(plan, 3)):
        line = next(x for x in text.splitlines() if x.strip().startswith(f"rank {rank}:"))
        assert ids and all(plan.shards[i].filename in line for i in ids)
    assert "rank 3:" not in text


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "n"), [("torchrun", 2), ("accelerate", 3), ("env", 2)])
def test_ranks_split_the_work_and_match_one_process(pair, tmp_path, launcher, n):
    out = tmp_path / "out"
    proc = _launch(launcher, n, pair.recipe, out)
    assert proc.returncode == 0, proc.stderr
    assert folder_files(out) == pair.reference  # every file, byte for byte, nothing extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch left beside
    read = _bytes_per_rank(proc.stderr)
    plan = pair.prepared.plan
    split = distributed.split_shards(plan, n)
    assert all(split)
    assert read == {rank: _input_bytes(plan, ids) for rank, ids in enumerate(split)}, proc.stderr
    assert sum(read.values()) == pair.bytes_read == plan.input_bytes
    assert proc.stdout.count("merged ") == 1  # only rank 0 reports


@needs_gloo
@pytest.mark.slow
def test_failing_rank_fails_the_run_naming_rank_and_shard(pair, tmp_path):
    plan = pair.prepared.plan
    first_of_rank_1 = plan.shards[distributed.split_shards(plan, 2)[1][0]]
    name = next(t.name for t in first_of_rank_1.tasks if t.is_float)
    b = _tensors(1)
    b[name].view(-1)[0] = float("nan")  # only rank 1 reads this tensor
    write_checkpoint(tmp_path / "b-nan", b, None, {"model_type": "llama"})
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(RECIPE.format(a=pair.root / "a", b=tmp_path / "b-nan"))
    out = tmp_path / "out"
    proc = _launch("torchrun", 2, recipe, out)
    assert proc.returncode != 0
    # Rank 1 reports its failure and rank 0 every rank's: the same text here (the two
    # processes share stderr, so their lines may run together).
    errors = re.findall(r"error: (.*?) was not written", proc.stderr)
    assert len(errors) == 2
    for text in errors:
        assert text.startswith("rank 1 on ") and first_of_rank_1.filename in text
        assert f"{name!r} in model B ({tmp_path / 'b-nan'}) contains NaN" in text
    assert proc.stderr.count("rerun with --resume") == 2
    assert not out.exists()


@needs_gloo
@pytest.mark.slow
def test_killed_rank_fails_the_run_and_resume_completes_it(pair, tmp_path):
    out = tmp_path / "out"
    # Rank 1 SIGKILLs itself once its first shard is done: it cannot report anything.
    killed = _launch(
        "torchrun", 2, pair.recipe, out, SHARDMERGE_KILL_AT="shard-done:1", SHARDMERGE_KILL_RANK="1"
    )
    assert killed.returncode != 0
    # torchrun names the rank that died; rank 0 stops with its own error.
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", killed.stderr)
    assert re.search(r"error: rank 0 .*(lost contact|was stopped)", killed.stderr)
    assert not out.exists()  # nothing looks complete
    # Resume with a different number of ranks: every rank trusts the shards any rank finished.
    resumed = _launch("torchrun-script", 3, pair.recipe, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert folder_files(out) == pair.reference
    assert 0 <= sum(_bytes_per_rank(resumed.stderr).values()) < pair.bytes_read
    # Requeued once more (a job script always passing --resume): nothing to do, exit 0.
    again = _launch("torchrun", 2, pair.recipe, out, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"{out} is already complete" in again.stdout
    assert folder_files(out) == pair.reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock or scratch left


def test_rank_report_lines_are_single_writes(monkeypatch):
    """Ranks share stderr: a line written in two pieces (text, then the newline, as print does
    unbuffered) can run into another rank's line, and then neither parses."""
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    distributed._report("rank 1: read 13520 input bytes")
    assert writes == ["rank 1: read 13520 input bytes\n"]
