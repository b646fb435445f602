"""``shardmerge compare``: stream two models (and a base) once and measure how they differ.

The I/O edge around :mod:`shardmerge.similarity`: model references are resolved and checked
against each other from headers alone (every mismatch reported at once, before a byte of tensor
data is read), then a reader thread fills a small fixed pool of chunk slots with the raw bytes
of every input (the engine's reader: ``preadv``, no mapping) while the calling thread adds each
chunk to its tensor's sums, on the CPU or a CUDA device. Memory stays at a few chunks whatever
the model size.

With ``CPU_WORKERS`` above one, compute threads add up chunks side by side on the CPU; each
chunk's sums are kept apart and added to its tensor's in chunk order, so the result never
depends on which thread did what.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shardmerge import import_torch, readahead
from shardmerge.errors import CheckpointError, InputError
from shardmerge.inventory import DTYPE_SIZES, TensorInfo
from shardmerge.matching import cap_problems, mismatches, tensor_sources, ties_embeddings
from shardmerge.plan import CHUNK_NUMEL
from shardmerge.recipe import ModelRef
from shardmerge.resolve import ResolvedModel, open_sources, resolve_model

if TYPE_CHECKING:
    import torch

    from shardmerge.shardio import ShardSource
    from shardmerge.similarity import Comparison, Sums

# Compute threads on the CPU (a CUDA device: one, its stream does the work). The sums are bound
# by memory bandwidth: on 2 shared cores a second thread took more CPU time and no less wall time
# (medium pair; README, "Cost"), so one, with every core but the reader's in torch's pool.
CPU_WORKERS = 1
# Chunk slots in flight: one per compute thread being added up, the others read ahead.
READ_AHEAD_SLOTS = 3
_STOP = object()


def parse_model_ref(text: str) -> ModelRef:
    """ "org/name@revision" or a local folder (taken whole, even with an "@" in its path)."""
    if Path(text).expanduser().is_dir():
        return ModelRef(text, None)
    ref, at, revision = text.rpartition("@")
    if at and ref.strip() and revision.strip():
        return ModelRef(ref, revision)
    if at:
        raise InputError(f"{text!r}: expected 'ref@revision' with both parts non-empty")
    return ModelRef(text, None)


@dataclass(frozen=True)
class _Task:
    name: str
    infos: tuple[TensorInfo, ...]  # a, b (, base)

    @property
    def numel(self) -> int:
        return self.infos[0].numel


def match_models(models: list[ResolvedModel]) -> tuple[list[_Task], list[str], list[str]]:
    """The tensors to compare, in the first model's file order; the integer tensors skipped; and
    warnings. Raises a CheckpointError listing every mismatch with the first model."""
    warnings: list[str] = []
    tied = ties_embeddings(models[0].inventory)
    sources = [tensor_sources(m.inventory, tied, warnings) for m in models]
    problems: list[str] = []
    for other, model in zip(sources[1:], models[1:], strict=True):
        problems += mismatches(models[0].label, sources[0], model.label, other)
    if problems:
        raise CheckpointError(cap_problems(problems))
    tasks, skipped = [], []
    for name, info in sources[0].items():
        if not info.is_float:
            skipped.append(name)
            continue
        tasks.append(_Task(name, tuple(s[name] for s in sources)))
    return tasks, skipped, warnings


def compare_models(
    refs: list[str], *, device: str = "auto", stream: bool = False
) -> tuple[Comparison, list[str]]:
    """Compare models ``refs`` = [a, b] or [a, b, base]; returns (Comparison, warnings).

    Raises:
        InputError: a reference that is neither a folder nor a Hub id, mismatched models, or an
            input tensor holding NaN or Inf (named with its model).
    """
    keys = ("a", "b", "base")[: len(refs)]
    models = [resolve_model(parse_model_ref(r), k) for r, k in zip(refs, keys, strict=True)]
    tasks, skipped, warnings = match_models(models)
    # From a cold disk the first chunks of local inputs load while torch imports.
    readahead.hint_start(_first_reads(tasks, models))
    from shardmerge.pipeline import resolve_device

    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="shardmerge-compare-") as scratch:
        files = [[t.infos[i].file for t in tasks] for i in range(len(models))]
        sources, ahead = open_sources(models, stream=stream, workdir=Path(scratch), files=files)
        try:
            results = _stream_sums(tasks, models, sources, dev)
        finally:
            if ahead is not None:  # the downloads stop however the comparison ends
                ahead.close()
    from shardmerge import similarity

    labels = {k: m.label for k, m in zip(keys, models, strict=True)}
    comparison = similarity.summarize(results, labels, with_base=len(models) == 3, skipped=skipped)
    return comparison, warnings


def _stream_sums(
    tasks: list[_Task], models: list[ResolvedModel], sources: list[ShardSource], dev_name: str
) -> list[tuple[str, Sums]]:
    import_torch()  # the CLI's first torch import, with the collector paused
    import torch

    from shardmerge import similarity
    from shardmerge.engine import TORCH_DTYPES, bytes_view
    from shardmerge.shardio import ShardReader

    dev = torch.device(dev_name)
    readers = [ShardReader(s, m.label) for s, m in zip(sources, models, strict=True)]
    itemsize = max((DTYPE_SIZES[i.dtype] for t in tasks for i in t.infos), default=4)
    free: queue.Queue[list[torch.Tensor]] = queue.Queue()
    workers = CPU_WORKERS if dev.type == "cpu" else 1
    for _ in range(workers + READ_AHEAD_SLOTS):
        free.put([torch.empty(CHUNK_NUMEL * itemsize, dtype=torch.uint8) for _ in models])
    ready: queue.Queue[object] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []
    remaining: dict[tuple[int, str], int] = {}
    for task in tasks:
        for side, info in enumerate(task.infos):
            remaining[side, info.file] = remaining.get((side, info.file), 0) + 1

    # The engine's read-ahead hints, started when a read waits for the disk (readahead.py).
    hints = readahead.ReadAhead(_read_spans(tasks, sources))
    for r in readers:
        r.on_slow_read = hints.start

    def read_loop() -> None:
        try:
            for index, task in enumerate(tasks):
                for start in range(0, task.numel, CHUNK_NUMEL):
                    slot = _take(free, stop)
                    if slot is None:
                        return
                    count = min(CHUNK_NUMEL, task.numel - start)
                    for reader, info, raw in zip(readers, task.infos, slot, strict=True):
                        size = DTYPE_SIZES[info.dtype]
                        reader.read_into(info, start * size, bytes_view(raw)[: count * size])
                    hints.advance(count * sum(DTYPE_SIZES[i.dtype] for i in task.infos))
                    ready.put((index, start, count, slot))
                for side, info in enumerate(task.infos):
                    remaining[side, info.file] -= 1
                    if remaining[side, info.file] == 0:
                        readers[side].close(info.file)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            errors.append(exc)
        finally:
            ready.put(_STOP)

    sums = [similarity.Sums() for _ in tasks]
    sub = similarity.sub_numel(dev)
    scratches: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
    for _ in range(workers):
        scratches.put(similarity.scratch_buffer(sub or CHUNK_NUMEL, dev))

    def add_up(item: tuple[int, int, int, list[torch.Tensor]]) -> similarity.Sums:
        """One chunk's sums, apart from its tensor's; its slot is free once they are known."""
        index, start, count, slot = item
        infos = tasks[index].infos
        typed = [
            raw[: count * DTYPE_SIZES[info.dtype]].view(TORCH_DTYPES[info.dtype]).to(dev)
            for raw, info in zip(slot, infos, strict=True)
        ]
        base = typed[2] if len(typed) == 3 else None
        part = similarity.Sums()
        scratch = scratches.get()
        try:
            similarity.accumulate(part, typed[0], typed[1], base, scratch, sub=sub)
        finally:
            scratches.put(scratch)
        free.put(slot)  # the sums are read back (a sync on CUDA): the slot is free
        return part

    reader = threading.Thread(target=read_loop, name="shardmerge-compare-read", daemon=True)
    reader.start()
    # One compute thread: the calling thread itself (no thread, no malloc arena of its own).
    pool = ThreadPoolExecutor(workers, "shardmerge-compare-sums") if workers > 1 else None
    pending: deque[tuple[int, int, int, Future[similarity.Sums]]] = deque()

    def finish() -> None:
        """Add the oldest chunk's sums to its tensor's (chunk order); check a finished tensor."""
        index, start, count, future = pending.popleft()
        sums[index].add(future.result())
        task = tasks[index]
        if start + count == task.numel and (bad := sums[index].non_finite()) is not None:
            label = models[("a", "b", "base").index(bad)].label
            raise CheckpointError(f"{label}: tensor {task.name!r} contains NaN or Inf values")

    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # A core for the reader, the others shared by the compute threads: with every core in
        # torch's pool, OpenMP's spinning workers fought the reader (medium pair, 2 cores:
        # 3.5-22 s per run; one thread: 3.6-4.2 s).
        torch.set_num_threads(max(1, ((os.cpu_count() or 2) - 1) // workers))
    try:
        while (item := ready.get()) is not _STOP:
            assert isinstance(item, tuple)
            index, start, count, _ = item
            if pool is None:
                future: Future[similarity.Sums] = Future()
                future.set_result(add_up(item))
            else:
                future = pool.submit(add_up, item)
            pending.append((index, start, count, future))
            if len(pending) >= workers:
                finish()
        while pending:
            finish()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        stop.set()
        while reader.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        hints.close()
        for r in readers:
            r.close_all()
    if errors:
        raise errors[0]
    return [(task.name, s) for task, s in zip(tasks, sums, strict=True)]


def _first_reads(tasks: list[_Task], models: list[ResolvedModel]) -> Iterator[readahead.Span]:
    """The local input ranges compare reads, in its order (a hint before the sources exist)."""
    for task in tasks:
        for model, info in zip(models, task.infos, strict=True):
            if model.local_dir is not None:
                yield readahead.Span(str(model.local_dir / info.file), info.begin, info.nbytes)


def _read_spans(tasks: list[_Task], sources: list[ShardSource]) -> Iterator[list[readahead.Span]]:
    """The byte ranges of each chunk the reader reads, in its order (local files only: a
    streamed shard may not be on the disk yet)."""
    from shardmerge.shardio import LocalSource

    paths: dict[tuple[int, str], str | None] = {}
    for task in tasks:
        for start in range(0, task.numel, CHUNK_NUMEL):
            count = min(CHUNK_NUMEL, task.numel - start)
            spans = []
            for side, info in enumerate(task.infos):
                if (side, info.file) not in paths:
                    source = sources[side]
                    local = isinstance(source, LocalSource)
                    try:
                        paths[side, info.file] = str(source.fetch(info.file)) if local else None
                    except InputError:
                        paths[side, info.file] = None  # the reader reports it
                size = DTYPE_SIZES[info.dtype]
                spans.append(
                    readahead.Span(paths[side, info.file], info.begin + start * size, count * size)
                )
            yield spans


def _take(
    pool: queue.Queue[list[torch.Tensor]], stop: threading.Event
) -> list[torch.Tensor] | None:
    while not stop.is_set():
        with contextlib.suppress(queue.Empty):
            return pool.get(timeout=0.1)
    return None
