"""Crash safety: SIGKILL a real run at exact points, then ``--resume`` to the same bytes.

The killed runs are subprocesses (``SHARDMERGE_KILL_AT``, see shardmerge.faults). Every run uses
a small engine chunk, so each shard takes several chunk writes and tensors take the two-pass
(stats, then combine) path. Resumed runs are in-process, where the number of reused shards can be
read from the RunResult.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shardmerge import cli, engine, pipeline
from tests.conftest import write_checkpoint

CHUNK_NUMEL = 4096  # elements per engine chunk here (the engine rounds to whole SLERP blocks)
INDEX = "model.safetensors.index.json"
PROGRESS = ".shardmerge-progress.json"
# Runs the CLI with a small engine chunk; argv: CHUNK_NUMEL, then the CLI arguments.
LAUNCHER = (
    "import sys; from shardmerge import engine; engine.CHUNK_NUMEL = int(sys.argv[1]); "
    "from shardmerge.cli import main; sys.exit(main(sys.argv[2:]))"
)
RECIPE = """\
models: {{a: {a}, b: {b}}}
t: {{default: {{gradient: [0.1, 0.9]}}, non_layer: {t}}}
output: {{shard_size: 30KB}}
"""


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(128, 64)}  # 2 chunks
    for i in range(3):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = rand(64, 64)  # 1 chunk
        t[f"model.layers.{i}.mlp.up_proj.weight"] = rand(160, 64)  # 3 chunks
        t[f"model.layers.{i}.input_layernorm.weight"] = rand(64)
    t["model.norm.weight"] = rand(64)
    t["lm_head.weight"] = rand(128, 64)
    t["model.num_batches_tracked"] = torch.tensor(seed + 3)
    return t


@dataclass(frozen=True)
class Models:
    a: Path
    b: Path
    recipe: Path


def _write_models(root: Path) -> Models:
    a = _tensors(0)
    names = list(a)
    config = {"model_type": "llama", "tie_word_embeddings": False}
    write_checkpoint(root / "a", a, [names[:5], names[5:]], config, {"tokenizer.json": "{}"})
    write_checkpoint(root / "b", _tensors(1), None, config)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(a=root / "a", b=root / "b", t=0.4))
    return Models(root / "a", root / "b", recipe)


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("SHARDMERGE_KILL_AT", None)
    if kill_at is not None:
        env["SHARDMERGE_KILL_AT"] = kill_at
    return env


def _run_subprocess(
    recipe: Path, out: Path, *extra: str, kill_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv = ["run", str(recipe), "--out", str(out), "--quiet", "--device", "cpu", *extra]
    return subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(CHUNK_NUMEL), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(kill_at),
    )


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _shard_count(files: dict[str, bytes]) -> int:
    return len([f for f in files if f.endswith(".safetensors")])


def _shard_name(files: dict[str, bytes], i: int) -> str:
    return f"model-{i:05d}-of-{_shard_count(files):05d}.safetensors"


def _partial(out: Path) -> Path:
    return out.parent / f".{out.name}.shardmerge-partial"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return _write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(models: Models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """An uninterrupted run's output folder, file by file."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = _run_subprocess(models.recipe, out)
    assert proc.returncode == 0, proc.stderr
    files = _folder_bytes(out)
    assert _shard_count(files) >= 4
    assert {INDEX, "config.json", "README.md", "tokenizer.json"} <= files.keys()
    return files


@pytest.fixture
def resume(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``shardmerge run RECIPE --out OUT --resume`` in-process; returns (exit code, stderr,
    shards reused)."""
    monkeypatch.setattr(engine, "CHUNK_NUMEL", CHUNK_NUMEL)
    results: list[pipeline.RunResult] = []
    real = pipeline.run_merge

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(pipeline, "run_merge", spy)

    def run(recipe: Path, out: Path) -> tuple[int, str, int | None]:
        results.clear()
        argv = ["run", str(recipe), "--out", str(out), "--quiet", "--device", "cpu", "--resume"]
        rc = cli.main(argv)
        err = capsys.readouterr().err
        return rc, err, results[0].skipped_shards if results else None

    return run


def _kill(models: Models, out: Path, point: str) -> dict:
    """Run until SIGKILLed at ``point``; check nothing complete-looking is left; return the
    progress record."""
    proc = _run_subprocess(models.recipe, out, kill_at=point)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert not out.exists()
    partial = _partial(out)
    assert partial.is_dir() and not (partial / INDEX).exists()
    return json.loads((partial / PROGRESS).read_text())


@pytest.mark.parametrize(
    ("point", "recorded"),
    [
        ("chunk-written:2", 0),  # the first shard's header and first chunk are written
        ("shard-done:1", 1),
        ("shard-done:2", 2),
        ("before-index:1", None),  # every shard, config, card: only the index is missing
    ],
)
def test_kill_then_resume_is_byte_identical(models, reference, resume, tmp_path, point, recorded):
    recorded = _shard_count(reference) if recorded is None else recorded
    out = tmp_path / "out"
    record = _kill(models, out, point)
    assert len(record["shards"]) == recorded

    rc, err, skipped = resume(models.recipe, out)
    assert rc == 0, err
    assert skipped == recorded
    assert _folder_bytes(out) == reference
    assert not _partial(out).exists()


def test_resume_in_a_subprocess_keeps_finished_shards(models, reference, tmp_path):
    out = tmp_path / "out"
    _kill(models, out, "shard-done:2")
    finished = [_partial(out) / _shard_name(reference, i) for i in (1, 2)]
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in finished]

    proc = _run_subprocess(models.recipe, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert _folder_bytes(out) == reference
    # Skipped shards are moved into place, never rewritten.
    moved = [out / p.name for p in finished]
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in moved] == stamps


def test_corrupted_finished_shard_is_redone(models, reference, resume, tmp_path):
    out = tmp_path / "out"
    _kill(models, out, "shard-done:2")
    shard = _partial(out) / _shard_name(reference, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))

    rc, err, skipped = resume(models.recipe, out)
    assert rc == 0, err
    assert skipped == 1  # shard 2 only; shard 1 failed its digest and was redone
    assert _folder_bytes(out) == reference


def test_resume_after_the_recipe_changed_is_refused(models, reference, resume, tmp_path):
    out = tmp_path / "out"
    _kill(models, out, "shard-done:1")
    changed = tmp_path / "changed.yaml"
    changed.write_text(RECIPE.format(a=models.a, b=models.b, t=0.6))

    rc, err, _ = resume(changed, out)
    assert rc == 2
    assert "Traceback" not in err
    assert "cannot resume" in err and "recipe or the inputs changed" in err
    assert "without --resume" in err
    assert not out.exists()

    # The refusal kept the finished shard: the original recipe still resumes.
    rc, err, skipped = resume(models.recipe, out)
    assert rc == 0, err
    assert skipped == 1
    assert _folder_bytes(out) == reference


def test_resume_after_an_input_changed_is_refused(resume, tmp_path):
    own = _write_models(tmp_path / "models")
    out = tmp_path / "out"
    _kill(own, out, "shard-done:1")
    b = _tensors(1)
    b["model.norm.weight"] += 1
    write_checkpoint(own.b, b, None)

    rc, err, _ = resume(own.recipe, out)
    assert rc == 2
    assert "Traceback" not in err
    assert "cannot resume" in err and "recipe or the inputs changed" in err
    assert not out.exists()


def test_two_runs_are_byte_identical(models, reference, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engine, "CHUNK_NUMEL", CHUNK_NUMEL)
    out = tmp_path / "out"  # the card's title is the folder's name
    rc = cli.main(["run", str(models.recipe), "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert _folder_bytes(out) == reference


def test_rerun_without_resume_says_how_to_resume(models, reference, capsys, tmp_path):
    out = tmp_path / "out"
    _kill(models, out, "shard-done:2")
    kept = _folder_bytes(_partial(out))
    rc = cli.main(["run", str(models.recipe), "--out", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    total = _shard_count(reference)
    assert err.strip().splitlines() == [
        f"error: an interrupted run of this recipe left 2 of {total} shard(s) finished in "
        f"{_partial(out)}: rerun with --resume to keep them, or with --overwrite to start over"
    ]
    assert _folder_bytes(_partial(out)) == kept and not out.exists()  # nothing discarded


def test_resume_on_a_finished_output_is_a_no_op(models, reference, resume, capsys, tmp_path):
    out = tmp_path / "out"
    assert _run_subprocess(models.recipe, out).returncode == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = cli.main(["run", str(models.recipe), "--out", str(out), "--quiet", "--resume"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out == f"{out} is already complete (same recipe and inputs): nothing to do\n"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert _folder_bytes(out) == reference
    # Another recipe's output is not "complete": --resume says what is there.
    changed = tmp_path / "changed.yaml"
    changed.write_text(RECIPE.format(a=models.a, b=models.b, t=0.6))
    rc = cli.main(["run", str(changed), "--out", str(out), "--quiet", "--resume"])
    assert rc == 2
    assert "finished merge of another recipe or other inputs" in capsys.readouterr().err


def test_killed_run_leftovers_go_with_the_resume(models, reference, resume, tmp_path):
    from shardmerge.output import lock_holder

    out = tmp_path / "out"
    _kill(models, out, "chunk-written:2")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".out.shardmerge-lock", ".out.shardmerge-partial"]  # nothing else beside
    assert lock_holder(out) is None  # the kernel released the dead run's lock
    assert list(_partial(out).glob(".shardmerge-scratch-*"))  # its scratch folder, inside
    rc, err, _ = resume(models.recipe, out)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _folder_bytes(out) == reference
