"""Read-ahead hints and dropping consumed input (shardmerge/readahead.py and the engine's use)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from shardmerge import engine, readahead, shardio
from shardmerge.engine import execute_plan
from shardmerge.pipeline import prepare
from shardmerge.recipe import parse_recipe
from shardmerge.shardio import LocalSource
from tests.test_engine import RECIPE, _pair

pytestmark = pytest.mark.skipif(
    not hasattr(os, "posix_fadvise"), reason="posix_fadvise is POSIX's (not on macOS)"
)


def _file(tmp_path: Path, size: int, header: bytes = b"{}") -> Path:
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(size))
    return path


def _record_fadvise(monkeypatch) -> list[tuple[int, int, int]]:
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return calls


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_hints_stay_within_the_window_and_start_where_the_reader_is(tmp_path, monkeypatch):
    path = str(_file(tmp_path, 10_000))
    calls = _record_fadvise(monkeypatch)
    steps = [[readahead.Span(path, 100 * i, 100)] for i in range(20)]
    hints = readahead.ReadAhead(steps, window=300)
    for _ in range(5):  # the reader reads 5 steps before it finds the disk slow
        hints.advance(100)
    hints.start()
    try:
        _wait_for(lambda: len(calls) == 3)
        time.sleep(0.05)
        assert len(calls) == 3  # the window: 300 bytes ahead of the reader, no more
        data_start = 8 + 2  # the 8-byte length and the '{}' header
        assert [c[0] - data_start for c in calls] == [500, 600, 700]  # steps 0-4 skipped
        assert {c[2] for c in calls} == {os.POSIX_FADV_WILLNEED}
        hints.advance(100)
        _wait_for(lambda: len(calls) == 4)
        assert calls[-1][0] - data_start == 800
        for hinted in range(5, 16):  # one step read, one more hinted, to the end
            hints.advance(100)
            _wait_for(lambda hinted=hinted: len(calls) == hinted)
        hints.advance(1000)  # the reader overtakes: nothing is hinted behind it
        time.sleep(0.05)
        assert len(calls) == 15
    finally:
        hints.close()
    assert hints.hinted_bytes == 1500
    assert [c[0] - data_start for c in calls] == [100 * i for i in range(5, 20)]


def test_a_step_larger_than_the_window_waits_for_the_reader(tmp_path, monkeypatch):
    path = str(_file(tmp_path, 10_000))
    calls = _record_fadvise(monkeypatch)
    hints = readahead.ReadAhead(
        [[readahead.Span(path, 0, 100)], [readahead.Span(path, 100, 5000)]], window=1000
    )
    hints.start()
    try:
        _wait_for(lambda: len(calls) == 1)
        time.sleep(0.05)
        assert len(calls) == 1
        hints.advance(100)  # nothing hinted is unread: the big step goes now
        _wait_for(lambda: len(calls) == 2)
    finally:
        hints.close()


def test_close_stops_a_waiting_thread_and_bad_paths_are_ignored(tmp_path):
    steps = [[readahead.Span(str(tmp_path / "missing"), 0, 100)]] * 10
    hints = readahead.ReadAhead(steps, window=100)
    hints.start()
    hints.close()  # joins: it would hang if the waiting thread missed the stop
    assert hints.hinted_bytes == 0
    assert not threading.enumerate().count(hints._thread)


def test_drop_only_when_the_inputs_do_not_fit():
    assert readahead.should_drop(6 << 30, 10 << 30)
    assert not readahead.should_drop(4 << 30, 10 << 30)
    assert not readahead.should_drop(6 << 30, None)  # unknown: keep the cache as it is


def _plan(tmp_path: Path, monkeypatch):
    # Small chunks, and only tiny tensors resident: the embeddings are read twice (sums, output).
    monkeypatch.setattr(engine, "CHUNK_NUMEL", 4096)
    monkeypatch.setattr(engine, "RESIDENT_NUMEL", 4096)
    path_a, path_b, _, _ = _pair(tmp_path)
    text = RECIPE.format(a=path_a, b=path_b, out=tmp_path / "unused", shard="20KB")
    return prepare(parse_recipe(text)).plan, path_a, path_b


def test_spans_are_exactly_what_the_reader_reads(tmp_path, monkeypatch):
    plan, path_a, path_b = _plan(tmp_path, monkeypatch)
    sources = LocalSource(path_a, "model A"), LocalSource(path_b, "model B")
    reads: list[tuple[str, int, int]] = []
    real_read = shardio.ShardReader.read_into

    def spy(self, info, byte_start, buf, *, last=True):
        reads.append((info.file, info.begin + byte_start, len(buf)))
        real_read(self, info, byte_start, buf, last=last)

    monkeypatch.setattr(shardio.ShardReader, "read_into", spy)
    out = tmp_path / "out"
    out.mkdir()
    result = execute_plan(plan, *sources, out)
    slots = engine.chunk_buffers(plan).slots
    spans = [s for step in engine._read_spans(plan, frozenset(), slots, sources) for s in step]
    assert [(Path(s.path).name, s.offset, s.length) for s in spans] == reads
    assert sum(s.length for s in spans) == result.bytes_read


def test_slow_reads_start_the_hints_and_the_output_is_unchanged(tmp_path, monkeypatch):
    plan, path_a, path_b = _plan(tmp_path, monkeypatch)
    sources = LocalSource(path_a, "model A"), LocalSource(path_b, "model B")
    created: list[readahead.ReadAhead] = []
    real_init = readahead.ReadAhead.__init__

    def spy_init(self, steps, **kw):
        real_init(self, steps, **kw)
        created.append(self)

    monkeypatch.setattr(readahead.ReadAhead, "__init__", spy_init)
    monkeypatch.setattr(shardio, "_SLOW_READ_RATE", 1e30)  # every read counts as slow...
    outputs = {}
    hinted = {}
    for mode in ("plain", "slow"):
        # ... that is long enough to count (plain: none is)
        monkeypatch.setattr(shardio, "_SLOW_READ_MIN_BYTES", 0 if mode == "slow" else 1 << 62)
        created.clear()
        out = tmp_path / mode
        out.mkdir()
        execute_plan(plan, *sources, out)
        outputs[mode] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        (hints,) = created
        hinted[mode] = (hints.started, hints.hinted_bytes)
    assert outputs["slow"] == outputs["plain"]
    assert hinted["plain"] == (False, 0)
    assert hinted["slow"][0] is True  # how much it hinted depends on how far ahead it got


def test_consumed_input_is_dropped_after_its_last_read_only(tmp_path, monkeypatch):
    plan, path_a, path_b = _plan(tmp_path, monkeypatch)
    sources = LocalSource(path_a, "model A"), LocalSource(path_b, "model B")
    monkeypatch.setattr(readahead, "should_drop", lambda *_: True)
    dropped: list[tuple[int, int]] = []
    monkeypatch.setattr(
        readahead, "drop", lambda fd, offset, length: dropped.append((offset, length))
    )
    reads: list[tuple[bool, int]] = []
    real_read = shardio.ShardReader.read_into

    def spy(self, info, byte_start, buf, *, last=True):
        reads.append((last, len(buf)))
        real_read(self, info, byte_start, buf, last=last)

    monkeypatch.setattr(shardio.ShardReader, "read_into", spy)
    out = tmp_path / "out"
    out.mkdir()
    result = execute_plan(plan, *sources, out)
    first_reads = [n for last, n in reads if not last]
    assert first_reads, "no tensor was read twice: the test would not test the second read"
    # Dropped: exactly the last reads (the sums pass of a twice-read tensor keeps its pages).
    assert [length for _, length in dropped] == [n for last, n in reads if last]
    assert sum(length for _, length in dropped) == result.bytes_read - sum(first_reads)


def test_hint_start_hints_the_first_bytes_only(tmp_path, monkeypatch):
    path = str(_file(tmp_path, 10_000))
    calls = _record_fadvise(monkeypatch)
    spans = [readahead.Span(path, 1000 * i, 1000) for i in range(10)]
    thread = readahead.hint_start(spans, budget=2500)
    assert thread is not None
    thread.join(5)
    assert [(c[0] - 10, c[1]) for c in calls] == [(0, 1000), (1000, 1000), (2000, 500)]


def test_a_merge_hints_its_first_local_reads_before_torch_is_needed(tmp_path, monkeypatch):
    from shardmerge import pipeline

    path_a, path_b, _, _ = _pair(tmp_path)
    text = RECIPE.format(a=path_a, b=path_b, out=tmp_path / "out", shard="20KB")
    prepared = prepare(parse_recipe(text))
    given: list[list[readahead.Span]] = []
    monkeypatch.setattr(readahead, "hint_start", lambda spans: given.append(list(spans)))
    pipeline.run_merge(prepared, out=tmp_path / "out", quiet=True, device="cpu")
    (spans,) = given
    expected = []
    for task in (t for shard in prepared.plan.shards for t in shard.tasks):
        if task.t != 1.0:  # t = 1 copies B: nothing of A is read
            expected.append(readahead.Span(str(path_a / task.a.file), task.a.begin, task.a.nbytes))
        if task.t != 0.0:
            expected.append(readahead.Span(str(path_b / task.b.file), task.b.begin, task.b.nbytes))
    assert spans == expected
    assert any(t.t == 0.0 for t in prepared.plan.tasks)  # the recipe has copies to leave out
