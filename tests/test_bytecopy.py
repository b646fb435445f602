"""The torch-free byte copier (a passthrough stack with no arithmetic): which plans take it, the
same files as the pass engine, no torch or matplotlib imported, resume after a kill, and input
damage found during the copy named in one line with nothing finished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from shardmerge import bytecopy, cli, passes, pipeline, shardio
from shardmerge.bytecopy import execute_copies
from shardmerge.errors import CheckpointError
from shardmerge.passes import execute_passes
from shardmerge.pipeline import prepare, run_merge
from shardmerge.plan import copies_only
from shardmerge.recipe import parse_recipe
from shardmerge.shardio import LocalSource
from tests.conftest import folder_files
from tests.test_methods import _family
from tests.test_resume import _run_subprocess

# Our format, small shards: several output files, and a tensor split across them is impossible,
# so every file boundary falls between tensors.
STACK = """\
method: passthrough
models:
  x: {{path: {m1}}}
  y: {{path: {m2}}}
layers:
  - {{x: 0-1}}
  - {{y: 1-2}}
  - {{x: 1}}
{extra}output: {{shard_size: 8KB{output}}}
"""


def _recipe(tmp_path: Path, folders: list[Path], extra: str = "", output: str = "") -> Path:
    recipe = tmp_path / "stack.yaml"
    recipe.write_text(STACK.format(m1=folders[1], m2=folders[2], extra=extra, output=output))
    return recipe


def _prepared(recipe: Path):
    return prepare(parse_recipe(recipe.read_text(), str(recipe)))


def test_which_plans_are_copies_only(tmp_path):
    folders, _ = _family(tmp_path, llama=True)
    assert copies_only(_prepared(_recipe(tmp_path, folders)).plan)
    # A scale other than 1 multiplies; a dtype change converts; other methods compute.
    scaled = _recipe(tmp_path, folders, "parameters: {scale: 0.5}\n")
    assert not copies_only(_prepared(scaled).plan)
    assert copies_only(_prepared(_recipe(tmp_path, folders, "parameters: {scale: 1}\n")).plan)
    converted = _recipe(tmp_path, folders, output=", dtype: float32")
    assert not copies_only(_prepared(converted).plan)
    linear = tmp_path / "linear.yaml"
    linear.write_text(
        f"method: linear\nmodels:\n  x: {{path: {folders[1]}, weight: 1}}\n"
        f"  y: {{path: {folders[2]}, weight: 1}}\n"
    )
    assert not copies_only(_prepared(linear).plan)


def test_plan_says_so_and_estimates_the_copiers_memory(tmp_path, capsys):
    folders, _ = _family(tmp_path, llama=True)
    for extra, copying in (("", True), ("parameters: {scale: 0.5}\n", False)):
        recipe = _recipe(tmp_path, folders, extra)
        assert cli.main(["plan", str(recipe), "--out", str(tmp_path / "out")]) == 0
        out = capsys.readouterr().out
        assert ("every tensor is copied as stored" in out) == copying
        assert "random seed" not in out  # passthrough draws nothing
        memory = int(out.split("estimated peak memory: ")[1].split(" MB")[0].replace(",", ""))
        # The copier: 4 slots of 8 MiB, a staging buffer, Python without torch (~26 MB);
        # a computed passthrough runs the pass engine (torch alone is ~220 MB).
        assert (memory < 100) == copying


@pytest.mark.parametrize("slot_bytes", [bytecopy.SLOT_BYTES, 4096, 1000])
def test_the_same_files_as_the_pass_engine(tmp_path, monkeypatch, slot_bytes):
    folders, _ = _family(tmp_path, llama=True)
    plan = _prepared(_recipe(tmp_path, folders)).plan
    assert len(plan.shards) > 2
    sources = [LocalSource(f, f.name) for f in folders[1:]]
    skip = frozenset({1})
    (tmp_path / "engine").mkdir()
    (tmp_path / "copy").mkdir()
    reference = execute_passes(plan, sources, tmp_path / "engine", skip_shards=skip)
    # Small slots split tensors across reads; a small staging buffer and direct-write size
    # put several shards through the O_DIRECT path (where the filesystem has one).
    monkeypatch.setattr(bytecopy, "SLOT_BYTES", slot_bytes)
    monkeypatch.setattr(shardio, "_STAGE_BYTES", 8192)
    monkeypatch.setattr(shardio, "_DIRECT_MIN", 4096)
    real_pwrite = shardio.ShardFile._pwrite_direct
    from_slots: list[bool] = []

    def record(self, view, pos):
        from_slots.append(view.obj is not self.stage)
        real_pwrite(self, view, pos)

    monkeypatch.setattr(shardio.ShardFile, "_pwrite_direct", record)
    progress: list[int] = []
    done: list[int] = []
    result = execute_copies(
        plan,
        sources,
        tmp_path / "copy",
        skip_shards=skip,
        on_progress=progress.append,
        on_shard_done=lambda i, r: done.append(i),
    )
    assert result == reference
    assert folder_files(tmp_path / "copy") == folder_files(tmp_path / "engine")
    assert plan.shards[1].filename not in folder_files(tmp_path / "copy")
    wanted = [i for i in range(len(plan.shards)) if i not in skip]
    assert done == wanted
    assert sum(progress) == sum(plan.shards[i].data_bytes for i in wanted)
    assert result.bytes_read == sum(plan.shards[i].data_bytes for i in wanted)
    if from_slots:  # this filesystem takes O_DIRECT: whole slots went to the disk from where
        assert any(from_slots) == (slot_bytes >= 4096)  # they are (a 1000-byte slot never can)


def test_a_run_of_copies_imports_neither_torch_nor_matplotlib(tmp_path):
    folders, _ = _family(tmp_path, llama=True)
    recipe = _recipe(tmp_path, folders)
    out = tmp_path / "out"
    code = (
        "import sys; from shardmerge.cli import main; "
        f"code = main(['run', {str(recipe)!r}, '--out', {str(out)!r}, '--quiet']); "
        "print(code, 'torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["0", "False", "False"]
    # The same output as the pass engine's copies (a scale of 1 there is made to compute).
    reference = tmp_path / "ref" / "out"
    engine_runs: list[str] = []

    def spy(plan, *args, **kwargs):
        engine_runs.append(plan.method)
        return real_execute(plan, *args, **kwargs)

    real_execute = passes.execute
    monkey = pytest.MonkeyPatch()
    try:
        monkey.setattr(pipeline, "copies_only", lambda plan, skip=frozenset(): False)
        monkey.setattr(passes, "execute", spy)
        assert cli.main(["run", str(recipe), "--out", str(reference), "--quiet"]) == 0
    finally:
        monkey.undo()
    assert engine_runs == ["passthrough"]
    assert folder_files(out) == folder_files(reference)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(index["metadata"]["shardmerge"]["shard_digests"]) == len(
        list(out.glob("*.safetensors"))
    )


def test_kill_then_resume_a_stack_of_copies(tmp_path):
    folders, _ = _family(tmp_path, llama=True)
    recipe = _recipe(tmp_path, folders)
    reference = tmp_path / "ref" / "out"
    assert cli.main(["run", str(recipe), "--out", str(reference), "--quiet"]) == 0
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    proc = _run_subprocess(recipe, out, kill_at="shard-done:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    prepared = _prepared(recipe)
    result = run_merge(prepared, out=out, quiet=True, resume=True)
    assert result.skipped_shards == 2
    assert folder_files(out) == folder_files(reference)


def test_an_input_cut_short_after_planning_is_named_and_nothing_is_finished(tmp_path, capsys):
    folders, states = _family(tmp_path, llama=True)
    recipe = _recipe(tmp_path, folders)
    prepared = _prepared(recipe)
    shard = next(folders[2].glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-64])  # the header still matches the plan; the last tensor is cut
    with pytest.raises(CheckpointError, match=rf"model 2 .*{shard.name}: .*truncated shard"):
        run_merge(prepared, out=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    shard.write_bytes(data)


def test_stored_bytes_are_copied_whatever_they_hold(tmp_path):
    # NaN and Inf pass through a copy unexamined (mergekit copies them too): nothing computes.
    folders, states = _family(tmp_path, llama=True)
    from tests.conftest import write_checkpoint

    odd = dict(states[1])
    odd["model.layers.0.mlp.up_proj.weight"] = torch.full((32, 16), float("nan")).bfloat16()
    config = json.loads((folders[1] / "config.json").read_text())
    write_checkpoint(tmp_path / "odd", odd, None, config)
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(f"method: passthrough\nmodels:\n  x: {{path: {tmp_path / 'odd'}}}\n")
    assert copies_only(_prepared(recipe).plan)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    from tests.test_methods import _read

    got = _read(tmp_path / "out")
    assert torch.isnan(got["model.layers.0.mlp.up_proj.weight"]).all()
    assert torch.equal(got["model.norm.weight"], odd["model.norm.weight"])


def test_slow_reads_start_hints_and_copied_input_leaves_the_cache_after_its_last_read(
    tmp_path, monkeypatch
):
    """From a cold disk (every read slow here) the copier hints the reads ahead of its reader;
    inputs larger than the memory (forced here) leave the page cache once copied for the last
    time: the layer the stack copies twice keeps its pages until its second copy."""
    from shardmerge import readahead

    folders, _ = _family(tmp_path, llama=True)
    plan = _prepared(_recipe(tmp_path, folders)).plan
    sources = [LocalSource(f, f.name) for f in folders[1:]]
    created: list[readahead.ReadAhead] = []
    real_init = readahead.ReadAhead.__init__

    def spy_init(self, steps, **kw):
        real_init(self, steps, **kw)
        created.append(self)

    monkeypatch.setattr(readahead.ReadAhead, "__init__", spy_init)
    monkeypatch.setattr(shardio, "_SLOW_READ_RATE", 1e30)
    reads: list[tuple[bool, int]] = []
    real_read = shardio.ShardReader.read_into

    def spy(self, info, byte_start, buf, *, last=True):
        reads.append((last, len(buf)))
        real_read(self, info, byte_start, buf, last=last)

    dropped: list[int] = []
    monkeypatch.setattr(shardio.ShardReader, "read_into", spy)
    monkeypatch.setattr(readahead, "drop", lambda fd, offset, length: dropped.append(length))
    outputs = {}
    for mode in ("plain", "cold"):
        monkeypatch.setattr(shardio, "_SLOW_READ_MIN_BYTES", 0 if mode == "cold" else 1 << 62)
        monkeypatch.setattr(readahead, "should_drop", lambda *_, m=mode: m == "cold")
        created.clear()
        reads.clear()
        dropped.clear()
        (tmp_path / mode).mkdir()
        result = execute_copies(plan, sources, tmp_path / mode)
        outputs[mode] = folder_files(tmp_path / mode)
        (hints,) = created
        if mode == "plain":
            assert not hints.started and not dropped
    assert outputs["cold"] == outputs["plain"]
    assert hints.started  # how much it hinted depends on how far ahead of the reader it got
    first = [n for last, n in reads if not last]
    assert first, "no tensor was copied twice: the stack would not test the second copy"
    assert dropped == [n for last, n in reads if last]
    assert sum(dropped) == result.bytes_read - sum(first)


def test_shard_writer_opens_at_the_header_and_finishes_at_the_last_byte(tmp_path):
    from types import SimpleNamespace

    from shardmerge.plan import OutputShard

    empty = OutputShard("empty.safetensors", (), b"H" * 8)  # a header and no tensor bytes
    full = OutputShard("full.safetensors", (), b"h" * 8)
    object.__setattr__(full, "data_bytes", 10)  # (cached_property: what its tasks would sum)
    plan: Any = SimpleNamespace(shards=[empty, full])
    progress: list[int] = []
    done: list[int] = []
    writer = shardio.ShardWriter(
        plan, tmp_path, on_progress=progress.append, on_shard_done=lambda i, r: done.append(i)
    )
    assert writer.position(0) == 8  # the header is written on opening
    writer.write(0, memoryview(b""))  # an empty tensor's chunk: the shard opens and is complete
    assert 0 not in writer.open and done == [0] and writer.position(0) == 8
    writer.write(0, memoryview(b""))  # another one after it: nothing happens
    with pytest.raises(AssertionError, match="past the end of empty.safetensors"):
        writer.write(0, memoryview(b"x"))
    writer.write(1, memoryview(b"0123"))
    assert 1 in writer.open and done == [0] and writer.position(1) == 12
    writer.write(1, memoryview(b"456789"))
    assert done == [0, 1] and progress == [4, 6]  # the headers are not progress
    assert [r.filename for r in writer.sorted_results()] == [
        "empty.safetensors",
        "full.safetensors",
    ]
    assert (tmp_path / "full.safetensors").read_bytes() == b"h" * 8 + b"0123456789"
    assert (tmp_path / "empty.safetensors").read_bytes() == b"H" * 8
    assert [r.size for r in writer.sorted_results()] == [8, 18]
