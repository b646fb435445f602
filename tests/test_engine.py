"""The streaming engine against an in-memory reference, on tiny hand-made checkpoints."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardmerge import engine, shardio
from shardmerge.pipeline import prepare, run_merge
from shardmerge.recipe import parse_recipe
from shardmerge.slerp import slerp
from tests.conftest import write_checkpoint

LAYERS = 4


def _tensors(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    t = {"model.embed_tokens.weight": rand(700, 16)}  # > 2 chunks of 4096 elements
    for i in range(LAYERS):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = rand(16, 16)
        t[f"model.layers.{i}.mlp.gate_proj.weight"] = rand(24, 16)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = rand(24, 16)
        t[f"model.layers.{i}.input_layernorm.weight"] = rand(16)
    for i in range(2):  # a second stack with its own depth
        t[f"vision.blocks.{i}.attn.weight"] = rand(8, 8)
    t["model.norm.weight"] = rand(16)
    t["lm_head.weight"] = rand(700, 16)
    t["bn.num_batches_tracked"] = torch.tensor(7 + seed, dtype=torch.int64)
    return t


def _pair(tmp_path: Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path, dict, dict]:
    a, b = _tensors(0, dtype), _tensors(1, dtype)
    names = list(a)
    # Differently sharded: A in three shards, B in one file.
    shards_a = [names[:7], names[7:15], names[15:]]
    config = {"model_type": "llama", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    write_checkpoint(tmp_path / "a", a, shards_a, config, {"tokenizer.json": "{}"})
    write_checkpoint(tmp_path / "b", b, None, config, {"tokenizer.json": '{"b": 1}'})
    return tmp_path / "a", tmp_path / "b", a, b


def _gradient(anchors: list[float], i: int, n: int) -> float:
    # mergekit's formula, written out independently of shardmerge.schedule.
    p = i / (n - 1) if n > 1 else 1.0
    s = p * (len(anchors) - 1)
    i0 = math.floor(s)
    f = s - i0
    return (1 - f) * anchors[i0] + f * anchors[min(i0 + 1, len(anchors) - 1)]


def _read_output(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(folder / file, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


RECIPE = """
models:
  a: {a}
  b: {b}
t:
  default: 0.25
  non_layer: 0.6
  rules:
    - match: self_attn
      gradient: [0, 0.5, 0.3, 0.7, 1]
    - regex: 'mlp\\.gate_'
      value: 0.8
    - match: mlp
      layers: {{0: 0.1, "1-2": 0.9}}
    - match: vision
      gradient: [0.2, 0.4]
output:
  dir: {out}
  shard_size: {shard}
"""


def _expected_t(name: str) -> float:
    if name.startswith("model.layers."):
        i = int(name.split(".")[2])
        if "self_attn" in name:
            return _gradient([0, 0.5, 0.3, 0.7, 1], i, LAYERS)
        if "mlp.gate_" in name:
            return 0.8
        if "mlp" in name and i in (0, 1, 2):
            return {0: 0.1, 1: 0.9, 2: 0.9}[i]
        return 0.25
    if name.startswith("vision.blocks."):
        return _gradient([0.2, 0.4], int(name.split(".")[2]), 2)
    return 0.6  # embeddings, final norm, lm_head, and the non-layer buffer


@pytest.mark.parametrize("chunk", [None, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_engine_matches_reference(tmp_path, monkeypatch, chunk, dtype):
    if chunk is not None:
        # Several chunks per tensor; the embeddings (11200 elements) exceed the resident limit
        # and take the two-pass path (sums, then a second read for the output).
        monkeypatch.setattr(engine, "CHUNK_NUMEL", chunk)
        monkeypatch.setattr(engine, "RESIDENT_NUMEL", 2 * chunk)
    path_a, path_b, a, b = _pair(tmp_path, dtype)
    out = tmp_path / "out"
    text = RECIPE.format(a=path_a, b=path_b, out=out, shard="20KB")
    run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    merged = _read_output(out)
    assert set(merged) == set(a)
    for name, value in merged.items():
        t = _expected_t(name)
        if a[name].is_floating_point():
            expected = slerp(a[name], b[name], t, chunk_numel=chunk or 1 << 22)
            assert value.dtype == dtype
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
        else:
            assert value.item() == round(a[name].item() * (1 - t) + b[name].item() * t)


def test_resident_tensor_may_hold_every_slot(tmp_path, monkeypatch):
    """A resident tensor keeps all its chunks' slots until its output is written. With as many
    chunks as slots the engine must still finish (emit steps need no new slot), with the
    reference result."""
    import threading

    from shardmerge import plan as plan_module

    chunk = 4096
    monkeypatch.setattr(engine, "CHUNK_NUMEL", chunk)
    monkeypatch.setattr(engine, "RESIDENT_NUMEL", 1 << 40)  # capped by the slots, 2 chunks
    monkeypatch.setattr(engine, "chunk_buffers", lambda p: plan_module.ChunkBuffers(2, 2, slots=2))
    assert engine._resident_numel(2) == 2 * chunk
    a, b = _tensors(0), _tensors(1)
    g = torch.Generator().manual_seed(2)
    for side in (a, b):  # 6400 elements: two chunks, resident, holding both slots
        side["model.layers.0.mlp.down_proj.weight"] = torch.randn(16, 400, generator=g).bfloat16()
    config = {"model_type": "llama", "tie_word_embeddings": False}
    path_a, path_b = tmp_path / "a", tmp_path / "b"
    write_checkpoint(path_a, a, None, config)
    write_checkpoint(path_b, b, None, config)
    out = tmp_path / "out"
    prepared = prepare(parse_recipe(RECIPE.format(a=path_a, b=path_b, out=out, shard="20KB")))
    done = threading.Event()

    def merge() -> None:
        run_merge(prepared, out=out, quiet=True, device="cpu")
        done.set()

    worker = threading.Thread(target=merge, daemon=True)
    worker.start()
    worker.join(60)
    assert done.is_set(), "the engine deadlocked"
    merged = _read_output(out)
    two_chunk = [
        n for n, v in a.items() if chunk < v.numel() <= 2 * chunk and v.is_floating_point()
    ]
    assert two_chunk, "the fixture needs tensors that fill both slots"
    for name in two_chunk:
        expected = slerp(a[name], b[name], _expected_t(name), chunk_numel=chunk)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0, msg=name)


def test_failing_step_stops_the_engine_whatever_thread_meets_it(tmp_path, monkeypatch):
    """A chunk that fails (NaN in model B) stops the merge with its error and never hangs it,
    whichever compute thread meets it, also with the queue of read steps full (slow sums, and
    integer steps behind that need no slot). Repeated: which thread takes which step varies."""
    import threading

    from shardmerge.errors import ShardmergeError

    monkeypatch.setattr(engine, "CHUNK_NUMEL", 4096)
    real_sums = engine.slerp.accumulate_chunk

    def slow_sums(*args, **kwargs):  # the reader fills the queue meanwhile
        time.sleep(0.005)
        real_sums(*args, **kwargs)

    monkeypatch.setattr(engine.slerp, "accumulate_chunk", slow_sums)
    g = torch.Generator().manual_seed(0)
    a = {"model.norm.weight": torch.randn(8000, generator=g).bfloat16()}  # two chunks
    b = {"model.norm.weight": torch.randn(8000, generator=g).bfloat16()}
    b["model.norm.weight"][5] = float("nan")
    for i in range(40):  # integer steps take no slot: the reader fills the queue with them
        a[f"steps.{i}"] = b[f"steps.{i}"] = torch.tensor([i], dtype=torch.int8)  # stored last
    config = {"model_type": "llama", "tie_word_embeddings": False}
    path_a, path_b = tmp_path / "a", tmp_path / "b"
    write_checkpoint(path_a, a, None, config)
    write_checkpoint(path_b, b, None, config)
    for attempt in range(12):
        out = tmp_path / f"out{attempt}"
        text = f"models: {{a: {path_a}, b: {path_b}}}\nt: 0.25\noutput: {{shard_size: 20KB}}\n"
        prepared = prepare(parse_recipe(text))
        assert prepared.plan.tasks[0].name == "model.norm.weight"
        raised: list[BaseException] = []

        def merge(prepared=prepared, out=out, raised=raised) -> None:
            try:
                run_merge(prepared, out=out, quiet=True, device="cpu")
            except BaseException as exc:  # noqa: BLE001 - checked below
                raised.append(exc)

        worker = threading.Thread(target=merge, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), f"the engine hung (attempt {attempt})"
        assert len(raised) == 1 and isinstance(raised[0], ShardmergeError)
        assert "model.norm.weight" in str(raised[0]) and "NaN" in str(raised[0])
        assert not out.exists()


def test_step_order_moves_only_sums_and_keeps_reads_in_task_order(tmp_path, monkeypatch):
    """A resident tensor's output steps wait behind the next task's sums steps (so a compute
    thread has work while the other finishes a tensor's sums); outputs stay in file order and
    inputs are read in task order (streaming deletes a file once the tasks using it are read)."""
    monkeypatch.setattr(engine, "CHUNK_NUMEL", 4096)
    path_a, path_b, _, _ = _pair(tmp_path)
    plan = prepare(
        parse_recipe(RECIPE.format(a=path_a, b=path_b, out=tmp_path / "o", shard="20KB"))
    ).plan
    slots = 8
    steps = list(engine._steps(plan, frozenset(), slots))
    plain = [
        s
        for i, shard in enumerate(plan.shards)
        for t in shard.tasks
        for s in engine._task_steps(t, i, engine._resident_numel(slots))
    ]
    key = [(s.task.name, s.kind, s.start) for s in steps]
    assert sorted(key) == sorted((s.task.name, s.kind, s.start) for s in plain)
    outputs = [k for k in key if k[1] not in ("load", "stats")]
    assert outputs == [
        (s.task.name, s.kind, s.start) for s in plain if s.kind not in ("load", "stats")
    ]
    reads = [k for k in key if k[1] != "emit"]  # every other step reads its chunk
    assert reads == [(s.task.name, s.kind, s.start) for s in plain if s.kind != "emit"]
    order = {t.name: i for i, t in enumerate(plan.tasks)}
    moved = [
        (s.task.name, later.task.name)
        for i, s in enumerate(steps)
        if s.kind == "emit"
        for later in steps[:i]
        if later.kind == "load" and order[later.task.name] > order[s.task.name]
    ]
    assert moved, "no sums step moved ahead of a previous tensor's output"
    held = 0  # resident chunks whose slots are held: never more than the slots
    for step in steps:
        held += step.kind == "load"
        held -= step.kind == "emit"
        assert held <= slots


def test_slots_carved_from_given_memory_give_the_same_files(tmp_path):
    """The CPU merge can take its chunk slots from memory mapped (and faulted in) beforehand."""
    import mmap

    from shardmerge.engine import execute_plan
    from shardmerge.plan import chunk_buffers
    from shardmerge.shardio import LocalSource

    path_a, path_b, _, _ = _pair(tmp_path)
    text = RECIPE.format(a=path_a, b=path_b, out=tmp_path / "unused", shard="20KB")
    plan = prepare(parse_recipe(text)).plan
    files = {}
    for mode in ("allocated", "given"):
        out = tmp_path / mode
        out.mkdir()
        memory = mmap.mmap(-1, chunk_buffers(plan).total_bytes) if mode == "given" else None
        execute_plan(
            plan, LocalSource(path_a, "model A"), LocalSource(path_b, "model B"), out,
            host_memory=memory,
        )  # fmt: skip
        files[mode] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        if memory is not None:
            assert memory.find(files[mode][plan.shards[0].filename][-64:]) >= 0  # used
    assert files["given"] == files["allocated"]


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_slot_memory_is_faulted_in_before_use():
    """The slots' memory is resident when handed over (populated on a thread during torch's
    import), not faulted in page by page as the merge starts."""
    from shardmerge.pipeline import _fault_in

    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    size = 64 << 20

    def resident_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    memory = _fault_in(size)()
    assert memory is not None and len(memory) == size
    assert resident_bytes() - before >= 0.9 * size
    memory.close()  # nothing else holds it


def test_failed_merge_waits_for_the_side_files(tmp_path, monkeypatch):
    """When the merge fails, the side files (written on a thread into the working folder) are
    finished before the error propagates: nothing keeps writing there while the caller goes on
    (a resume right after a refused one raced with it)."""
    from shardmerge import pipeline
    from shardmerge.errors import ShardmergeError

    real = pipeline.write_side_files
    finished = []

    def slow(prepared, work, out_name):
        time.sleep(0.5)
        real(prepared, work, out_name)
        finished.append(True)

    monkeypatch.setattr(pipeline, "write_side_files", slow)
    a, b = _tensors(0), _tensors(1)
    b["model.norm.weight"][0] = float("nan")
    config = {"model_type": "llama", "tie_word_embeddings": False}
    write_checkpoint(tmp_path / "a", a, None, config)
    write_checkpoint(tmp_path / "b", b, None, config)
    out = tmp_path / "out"
    text = RECIPE.format(a=tmp_path / "a", b=tmp_path / "b", out=out, shard="20KB")
    with pytest.raises(ShardmergeError, match="NaN"):
        run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    assert finished, "the error came back while the side files were still being written"


def test_side_file_failure_fails_the_run(tmp_path, monkeypatch):
    """Config, tokenizer and card are written on a thread during the merge; what goes wrong there
    fails the run, and no output folder appears."""
    from shardmerge import pipeline

    def broken(prepared, work, out_name):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_side_files", broken)
    path_a, path_b, _, _ = _pair(tmp_path)
    out = tmp_path / "out"
    text = RECIPE.format(a=path_a, b=path_b, out=out, shard="20KB")
    with pytest.raises(OSError, match="No space left"):
        run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    assert not out.exists()


def test_output_layout_index_and_files(tmp_path):
    path_a, path_b, a, _ = _pair(tmp_path)
    out = tmp_path / "out"
    limit = 20000
    text = RECIPE.format(a=path_a, b=path_b, out=out, shard=limit)
    run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = 0
    for file in files:
        with safe_open(out / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]  # noqa: SIM118
        total += sum(sizes)
        assert sum(sizes) <= limit or len(sizes) == 1  # a tensor above the limit stands alone
    assert (
        index["metadata"]["total_size"]
        == total
        == sum(t.numel() * t.element_size() for t in a.values())
    )
    assert (out / "tokenizer.json").read_text() == "{}"  # from model A (tokenizer_from: a)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "shardmerge" in card and "self_attn" in card and "```yaml" in card
    assert not list(tmp_path.glob(".*partial*"))  # the working folder was renamed into place


def test_t0_output_is_model_a_bit_for_bit(tmp_path):
    path_a, path_b, a, _ = _pair(tmp_path)
    out = tmp_path / "out"
    text = f"models: {{a: {path_a}, b: {path_b}}}\nt: 0\noutput: {{dir: {out}}}\n"
    run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    merged = _read_output(out)
    for name, value in a.items():
        assert torch.equal(merged[name], value), name
        assert merged[name].dtype == value.dtype


def test_out_dtype_and_tokenizer_from_b(tmp_path):
    path_a, path_b, a, b = _pair(tmp_path)
    out = tmp_path / "out"
    text = (
        f"models: {{a: {path_a}, b: {path_b}}}\nt: 0.5\ntokenizer_from: b\n"
        f"output: {{dir: {out}, dtype: float32}}\n"
    )
    run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    merged = _read_output(out)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert merged[name].dtype == torch.float32
    torch.testing.assert_close(
        merged[name], slerp(a[name], b[name], 0.5, out_dtype=torch.float32), rtol=0, atol=0
    )
    assert (out / "tokenizer.json").read_text() == '{"b": 1}'
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_tied_first_model_drops_lm_head(tmp_path):
    a, b = _tensors(0), _tensors(1)
    del a["lm_head.weight"]
    write_checkpoint(tmp_path / "a", a, None, {"tie_word_embeddings": True})
    write_checkpoint(tmp_path / "b", b, None, {"tie_word_embeddings": False})
    out = tmp_path / "out"
    text = f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\nt: 0.5\noutput: {{dir: {out}}}\n"
    prepared = prepare(parse_recipe(text))
    assert any("lm_head" in w for w in prepared.plan.warnings)
    run_merge(prepared, out=out, quiet=True, device="cpu")
    assert "lm_head.weight" not in _read_output(out)


def test_untied_first_model_materialises_lm_head_from_tied_second(tmp_path):
    a, b = _tensors(0), _tensors(1)
    del b["lm_head.weight"]
    write_checkpoint(tmp_path / "a", a, None, {"tie_word_embeddings": False})
    write_checkpoint(tmp_path / "b", b, None, {"tie_word_embeddings": True})
    out = tmp_path / "out"
    text = f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\nt: 0.5\noutput: {{dir: {out}}}\n"
    run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    expected = slerp(a["lm_head.weight"], b["model.embed_tokens.weight"], 0.5)
    assert torch.equal(_read_output(out)["lm_head.weight"], expected)


def test_merge_is_deterministic(tmp_path):
    path_a, path_b, _, _ = _pair(tmp_path)
    outs = []
    for name in ("o1", "o2"):
        out = tmp_path / name
        text = RECIPE.format(a=path_a, b=path_b, out=out, shard="2KB")
        run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    assert outs[0] == outs[1]


def test_transformers_loads_merged_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp_path / name, max_shard_size="20KB")
    out = tmp_path / "out"
    text = (
        f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\n"
        "t: {default: {gradient: [0.2, 0.8]}, non_layer: 0.5}\n"
        f"output: {{dir: {out}}}\n"
    )
    run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device="cpu")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = merged(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64)
    assert torch.isfinite(logits).all()
    assert merged.dtype == torch.bfloat16


def test_direct_io_writer_gives_identical_files(tmp_path, monkeypatch):
    """Shards big enough for O_DIRECT (forced here with an 8 KiB staging buffer and 8 KiB chunks)
    are byte for byte the files the buffered writer makes, padding and truncation included, both
    where chunks go to the disk straight from their slots and where O_DIRECT is refused."""
    import mmap

    from shardmerge.engine import execute_plan
    from shardmerge.plan import chunk_buffers
    from shardmerge.shardio import LocalSource

    path_a, path_b, _, _ = _pair(tmp_path)
    text = RECIPE.format(a=path_a, b=path_b, out=tmp_path / "unused", shard="30KB")
    plan = prepare(parse_recipe(text)).plan
    monkeypatch.setattr(engine, "CHUNK_NUMEL", 4096)  # 8 KiB of bf16 per chunk
    monkeypatch.setattr(shardio, "_DIRECT_MIN", 4096)
    opened = []
    real_init = shardio.ShardFile.__init__

    def spy(self, path, size):
        real_init(self, path, size)
        opened.append(self.stage is not None)

    real_pwrite = shardio.ShardFile._pwrite_direct
    from_slots = []

    def record(self, view, pos):
        from_slots.append(not isinstance(view.obj, mmap.mmap))  # not the staging buffer
        real_pwrite(self, view, pos)

    def refuse(self, view, pos):
        # Some filesystems accept O_DIRECT at open and refuse the writes (EINVAL).
        raise OSError(errno.EINVAL, "Invalid argument")

    def cannot_pin(self, view, pos):
        # The kernel may not pin pages that another driver pinned for direct I/O (EFAULT).
        raise OSError(errno.EFAULT, "Bad address")

    outputs = {}
    writers = {"refused": refuse, "efault": cannot_pin}
    for mode, stage in (
        ("buffered", 1 << 40), ("direct", 8192), ("refused", 8192), ("efault", 8192)
    ):  # fmt: skip
        monkeypatch.setattr(shardio, "_STAGE_BYTES", stage)
        monkeypatch.setattr(shardio.ShardFile, "_pwrite_direct", writers.get(mode, record))
        monkeypatch.setattr(shardio.ShardFile, "__init__", spy)
        opened.clear()
        out = tmp_path / mode
        out.mkdir()
        memory = mmap.mmap(-1, chunk_buffers(plan).total_bytes)  # page-aligned slots
        sources = LocalSource(path_a, "model A"), LocalSource(path_b, "model B")
        execute_plan(plan, *sources, out, host_memory=memory)
        outputs[mode] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
        if mode == "buffered":
            assert opened and not any(opened)
        elif not any(opened):
            pytest.skip("this filesystem refuses O_DIRECT")
    assert any(from_slots), "no chunk was written straight from its slot"
    assert not all(from_slots), "the staging buffer was never written"
    assert outputs["direct"] == outputs["buffered"]
    assert outputs["refused"] == outputs["buffered"]
    assert outputs["efault"] == outputs["buffered"]
    for data in outputs["direct"].values():
        (header_len,) = struct.unpack("<Q", data[:8])
        assert (8 + header_len) % 4096 == 0  # the data section starts on a block boundary


def test_card_names_local_inputs_by_folder_and_titles_by_output(tmp_path, monkeypatch):
    path_a, path_b, _, _ = _pair(tmp_path)
    out = tmp_path / "my-merge"
    text = RECIPE.format(
        a=path_a, b=f"{{path: {path_b}, name: acme/finetune}}", out=out, shard="20KB"
    )
    prepared = prepare(parse_recipe(text))
    run_merge(prepared, out=out, quiet=True, device="cpu")
    card = (out / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]
    assert body.lstrip().startswith("# my-merge\n")  # not a generic "Merged model"
    assert f"- `{path_a.name}` (t = 0 end)" in body and "- `acme/finetune` (t = 1 end)" in body
    assert str(tmp_path) not in card  # no path of this machine, the recipe block included
    # The regex rule's column keeps its backslash (as code in the header).
    assert r"| `re:mlp\.gate_` |" in card
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert str(tmp_path) not in json.dumps(index["metadata"])
    assert json.dumps(index["metadata"]).count(path_a.name + "@") == 1
    from shardmerge import hub, pipeline

    sent = {}
    monkeypatch.setattr(hub, "push_folder", lambda *a, **k: sent.update(k))
    pipeline.push_output(out, "me/merged", private=False, prepared=prepared)
    assert sent["commit_message"] == f"SLERP merge of {path_a.name} and acme/finetune (shardmerge)"
    named = dataclasses.replace(prepared.recipe, name="Acme SLERP 7B")
    other = tmp_path / "other"
    run_merge(dataclasses.replace(prepared, recipe=named), out=other, quiet=True, device="cpu")
    assert "\n# Acme SLERP 7B\n" in (other / "README.md").read_text()


def test_output_is_on_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Every file's data, the index and the folder are fsync'ed before the rename that makes
    the output look complete; the rename itself is synced after (the parent folder)."""
    path_a, path_b, _, _ = _pair(tmp_path)
    out = tmp_path / "out"
    text = RECIPE.format(a=path_a, b=path_b, out=out, shard="20KB")
    prepared = prepare(parse_recipe(text))
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target: Path) -> Path:
        events.append(("rename", f"{self} -> {target}"))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    run_merge(prepared, out=out, quiet=True, device="cpu")
    work = tmp_path / ".out.shardmerge-partial"
    final = events.index(("rename", f"{work} -> {out}"))
    synced = {path for kind, path in events[:final] if kind == "fsync"}
    files = {str(work / p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert len(files) >= 5 and files <= synced  # shards, index, config, tokenizer, card
    assert str(work) in synced
    index_synced = events.index(("fsync", str(work / "model.safetensors.index.json")))
    assert all(events.index(("fsync", f)) < index_synced for f in files if "index" not in f)
    assert ("fsync", str(tmp_path)) in events[final:]  # the rename, durable
