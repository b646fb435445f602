"""Runs started at once on the same output: exactly one succeeds and its output is whole.

Real processes, started together, many times (``SHARDMERGE_LOCK_TRIALS``, default 6; the
measured figure in the README comes from a longer run). Without the output lock about 2 tries
in 20 ended with both runs "succeeding" over a folder missing shards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardmerge import cli
from shardmerge.output import output_lock
from shardmerge.verify import verify_output
from tests.conftest import write_checkpoint

TRIALS = int(os.environ.get("SHARDMERGE_LOCK_TRIALS", "6"))
SHARDS = 8


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    for key, seed in (("a", 0), ("b", 1)):
        g = torch.Generator().manual_seed(seed)
        tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 64, generator=g)
                   for i in range(SHARDS)}  # fmt: skip
        write_checkpoint(root / key, tensors, None, {"model_type": "llama"})
    path = root / "recipe.yaml"
    # 16 KB tensors, 20 KB shards: one tensor per shard.
    path.write_text(f"models: {{a: {root / 'a'}, b: {root / 'b'}}}\nt: 0.5\n"
                    "output: {shard_size: 20KB}\n")  # fmt: skip
    return path


def _start(recipe: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shardmerge", "run", str(recipe), "--out", str(out), "--quiet",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_two_runs_at_once_one_wins_and_the_output_is_whole(recipe, tmp_path):
    outcomes = []
    for trial in range(TRIALS):
        out = tmp_path / f"out{trial}"
        runs = [_start(recipe, out), _start(recipe, out)]
        results = [(run.wait(120), *run.communicate()) for run in runs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 2], results
        loser_err = next(err for code, _, err in results if code == 2)
        assert "Traceback" not in loser_err and len(loser_err.strip().splitlines()) == 1
        # At once: the lock names the holder; a moment later: the finished folder is in the way.
        busy = "being written by another shardmerge run (pid " in loser_err
        assert busy or "is not empty" in loser_err, loser_err
        outcomes.append(busy)
        report = verify_output(out)
        assert report.ok, report.summary()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == SHARDS
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{trial}")) == []
    print(f"{TRIALS} trials: {sum(outcomes)} refused by the lock, the rest by the finished output")


def test_a_held_lock_names_its_holder(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    with output_lock(out):
        rc = cli.main(["run", str(recipe), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (
        f"error: output {out} is being written by another shardmerge run (pid {os.getpid()} "
        f"on {socket.gethostname()}); wait for it, or stop it and rerun with --resume\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file went with the lock
