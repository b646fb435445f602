"""Execute a plan of any registered method: K aligned inputs per tensor, streamed through the
method's passes in fixed pools.

Per tensor the method (:mod:`shardmerge.methods`) declares how many reduction passes it needs
before its combine; this module knows passes, not methods. Threads overlap: a reader fills
slots (one chunk of every input) from a fixed pool in the plan's order, compute threads run each
chunk through ``reduce`` (pass by pass, ``end_pass`` after each) and then ``combine``, and a
writer puts the merged chunks at their planned offsets in file order (the shard files, digests
and resume records are :mod:`shardmerge.engine`'s). On a CPU two compute threads take chunks
side by side where the method allows it (``in_any_order``), each phase of a tensor starting once
the one before it is done; merged chunks reach the writer in output order whatever thread made
them, so the files are the same bytes as with one thread. A tensor whose chunks fit in the pool at once
is read once and kept between its passes; a larger one (an embedding) is read once per pass, so
memory stays a few chunks whatever the tensor's size.

SLERP keeps its dedicated two-input path (:func:`shardmerge.engine.execute_plan`), which
overlaps two compute threads; :func:`execute` picks the path from the plan's method.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from shardmerge import heap
from shardmerge.engine import TORCH_DTYPES, bytes_view, execute_plan
from shardmerge.errors import InputError, ShardmergeError
from shardmerge.inventory import DTYPE_SIZES
from shardmerge.mergestats import Recorder
from shardmerge.methods import TensorJob, TensorMerge, get_method
from shardmerge.methods.task_vectors import L1_BLOCK
from shardmerge.plan import (
    PASS_CHUNK_NUMEL,
    PASS_COMPUTE_THREADS,
    PASS_SLOTS,
    MergePlan,
    TensorTask,
    copies,
)
from shardmerge.shardio import (
    ExecuteResult,
    ShardReader,
    ShardResult,
    ShardSource,
    ShardWriter,
)

__all__ = ["CHUNK_NUMEL", "execute", "execute_passes", "merge_tensor"]

# Elements per chunk (rounded up to whole L1 blocks). Smaller than SLERP's: a method's combine
# makes a few K-input temporaries of the chunk, and these bound the working set.
CHUNK_NUMEL = PASS_CHUNK_NUMEL
# Chunk slots (each holds one chunk of every input); a tensor of at most SLOTS - 1 chunks is
# read once for all its passes.
SLOTS = PASS_SLOTS
# Compute threads on a CPU (each with its share of torch's pool).
CPU_WORKERS = PASS_COMPUTE_THREADS


def _chunk_numel() -> int:
    # Whole L1 blocks per chunk, so block sums (and so the rescale factors) never depend on it.
    return max(L1_BLOCK, -(-CHUNK_NUMEL // L1_BLOCK) * L1_BLOCK)


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)] or [(0, 0)]


def _method_chunk(chunk: int, row_aligned: bool, row_len: int) -> int:
    """A method's chunk: whole rows when it needs them (at least one row, even past ``chunk``)."""
    if not row_aligned or row_len <= 0:
        return chunk
    return max(1, chunk // row_len) * row_len


def merge_tensor(
    job: TensorJob, method: str, inputs: Sequence[torch.Tensor], chunk_numel: int | None = None
) -> torch.Tensor:
    """Merge in-memory flat inputs (merge dtype) exactly as the engine does, chunk by chunk."""
    spec = get_method(method)
    merge = spec.start(job)
    chunk = _method_chunk(chunk_numel or _chunk_numel(), spec.row_aligned, job.row_len)
    spans = _spans(job.numel, chunk)
    for p in range(merge.passes):
        for s, e in spans:
            merge.reduce(p, [x[s:e] for x in inputs], s)
        merge.end_pass(p)
    # The engine's cast to the written dtype: each combine result is rounded to it once.
    out = torch.empty(job.numel, dtype=job.out_dtype or job.dtype, device=inputs[0].device)
    for s, e in spans:
        out[s:e] = merge.combine([x[s:e] for x in inputs], s)
    return out


def execute(
    plan: MergePlan,
    sources: Sequence[ShardSource],
    out_dir: Path,
    *,
    labels: Sequence[str] | None = None,
    device: str = "cpu",
    skip_shards: frozenset[int] = frozenset(),
    on_progress: Callable[[int], None] | None = None,
    on_shard_done: Callable[[int, ShardResult], None] | None = None,
    host_memory: object = None,
    recorder: Recorder | None = None,
) -> ExecuteResult:
    """Write every shard of ``plan`` (except ``skip_shards``) into ``out_dir``, by the plan's
    method: SLERP on its fast path, the others through :func:`execute_passes`."""
    if plan.method == "slerp":
        return execute_plan(
            plan,
            sources[0],
            sources[1],
            out_dir,
            device=device,
            skip_shards=skip_shards,
            on_progress=on_progress,
            on_shard_done=on_shard_done,
            host_memory=host_memory,  # type: ignore[arg-type]
            recorder=recorder,
        )
    return execute_passes(
        plan,
        sources,
        out_dir,
        labels=labels,
        device=device,
        skip_shards=skip_shards,
        on_progress=on_progress,
        on_shard_done=on_shard_done,
        recorder=recorder,
    )


Kind = Literal["reduce", "combine", "copy"]


class _Progress:
    """Where one tensor's merge stands: its current phase (a pass, then ``passes`` for the
    combine) and how many chunks of that phase are done. Guarded by the engine's condition."""

    __slots__ = ("done", "phase")

    def __init__(self) -> None:
        self.phase = 0
        self.done = 0


@dataclass
class _Item:
    task: TensorTask
    shard: int
    kind: Kind
    pass_index: int
    start: int
    end: int
    merge: TensorMerge | None
    slot: list[torch.Tensor]
    index: int  # the chunk's place in its phase
    chunks: int  # chunks in the phase
    release: bool  # the slot goes back to the pool after this item
    progress: _Progress | None = None
    out_seq: int = -1  # copy and combine items: their place in the output order


_STOP = object()


def execute_passes(
    plan: MergePlan,
    sources: Sequence[ShardSource],
    out_dir: Path,
    *,
    labels: Sequence[str] | None = None,
    device: str = "cpu",
    skip_shards: frozenset[int] = frozenset(),
    on_progress: Callable[[int], None] | None = None,
    on_shard_done: Callable[[int, ShardResult], None] | None = None,
    recorder: Recorder | None = None,
) -> ExecuteResult:
    """Write every shard of a non-SLERP ``plan`` (except ``skip_shards``) into ``out_dir``;
    ``recorder`` gets each float tensor's statistics once its last chunk is combined."""
    method = get_method(plan.method)
    dev = torch.device(device)
    heap.keep_temporaries()  # chunk temporaries reuse freed memory, not fresh page faults
    workers = min(CPU_WORKERS, os.cpu_count() or 1) if dev.type == "cpu" else 1
    names = labels or [f"input {i + 1}" for i in range(len(sources))]
    readers = [ShardReader(src, label) for src, label in zip(sources, names, strict=True)]
    for model_reader in readers:
        model_reader.peers = readers
    chunk = _chunk_numel()
    # One buffer per input position (a sliced stack's tasks may have fewer inputs than models).
    positions = max((len(t.inputs) for t in plan.tasks), default=len(readers))
    itemsizes = [
        max((DTYPE_SIZES[t.inputs[i].dtype] for t in plan.tasks if i < len(t.inputs)), default=4)
        for i in range(positions)
    ]
    free: queue.Queue[list[torch.Tensor]] = queue.Queue()
    pool_ids: set[int] = set()
    for _ in range(SLOTS):
        slot = [_page_aligned(chunk * size) for size in itemsizes]
        pool_ids.add(id(slot))
        free.put(slot)

    def release(slot: list[torch.Tensor]) -> None:
        if id(slot) in pool_ids:  # an oversized row's own buffers are simply dropped
            free.put(slot)

    ready: queue.Queue[object] = queue.Queue(maxsize=SLOTS)
    to_write: queue.Queue[object] = queue.Queue(maxsize=SLOTS)
    errors: list[BaseException] = []
    stop = threading.Event()
    remaining = _file_refcounts(plan, skip_shards)

    def take() -> list[torch.Tensor] | None:
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                return free.get(timeout=0.1)
        return None

    def read(task: TensorTask, start: int, end: int, which: Sequence[int]) -> list[torch.Tensor]:
        slot: list[torch.Tensor] | None
        if end - start > chunk:
            # A row longer than a chunk (row-aligned methods; in practice a large 1-D tensor):
            # buffers of its own, outside the pool.
            slot = [torch.empty((end - start) * size, dtype=torch.uint8) for size in itemsizes]
        else:
            slot = take()
        if slot is None:
            raise _Stopped
        for i in which:
            info = task.inputs[i]
            size = DTYPE_SIZES[info.dtype]
            readers[task.model_of(i)].read_into(
                info, start * size, bytes_view(slot[i])[: (end - start) * size]
            )
        return slot

    def items() -> Iterator[_Item]:
        for index, shard in enumerate(plan.shards):
            if index in skip_shards:
                continue
            for task in shard.tasks:
                yield from _task_items(task, index)
                for i, info in enumerate(task.inputs):
                    model = task.model_of(i)
                    remaining[model, info.file] -= 1
                    if remaining[model, info.file] == 0:
                        readers[model].close(info.file)

    def _task_items(task: TensorTask, shard: int) -> Iterator[_Item]:
        row_len = _row_len(task)
        spans = _spans(task.inputs[0].numel, _method_chunk(chunk, method.row_aligned, row_len))
        if not task.is_float or copies(task, method):
            # Integer/bool tensors come from the first input, as stored; so does a plain copy.
            for s, e in spans:
                slot = read(task, s, e, [0])
                yield _Item(task, shard, "copy", 0, s, e, None, slot, 0, len(spans), release=True)
            return
        merge = method.start(_job(plan, task, dev))
        progress = _Progress()

        def at(kind: Kind, phase: int, i: int, slot: list[torch.Tensor], release: bool) -> _Item:
            s, e = spans[i]
            return _Item(
                task, shard, kind, phase, s, e, merge, slot, i, len(spans), release, progress
            )

        everything = range(len(task.inputs))
        resident = merge.passes > 0 and len(spans) <= SLOTS - 1
        held: list[list[torch.Tensor]] = []
        for p in range(merge.passes):
            for i, (s, e) in enumerate(spans):
                if resident and p > 0:
                    slot = held[i]
                else:
                    slot = read(task, s, e, everything)
                    if resident:
                        held.append(slot)
                yield at("reduce", p, i, slot, release=not resident)
        for i, (s, e) in enumerate(spans):
            slot = held[i] if resident else read(task, s, e, everything)
            yield at("combine", merge.passes, i, slot, release=True)

    def read_loop() -> None:
        out_seq = 0
        try:
            for item in items():
                if stop.is_set():
                    return
                if item.kind != "reduce":
                    item.out_seq, out_seq = out_seq, out_seq + 1
                ready.put(item)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
        finally:
            ready.put(_STOP)

    shards = ShardWriter(plan, out_dir, on_progress=on_progress, on_shard_done=on_shard_done)

    def write(shard_index: int, data: torch.Tensor) -> None:
        shards.write(shard_index, bytes_view(data), data, in_place=True)

    def write_loop() -> None:
        try:
            while (entry := to_write.get()) is not _STOP:
                assert isinstance(entry, tuple)
                shard_index, data, slot = entry
                write(shard_index, data)
                if slot is not None:
                    release(slot)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()
            while to_write.get() is not _STOP:  # keep draining: never block the computer
                pass

    # Compute workers: on a CPU, two threads take chunks side by side (each torch op releases
    # the GIL). A phase a method does not declare order-free (see TensorMerge.in_any_order) runs
    # its chunks one after another in flat order; a pass ends (end_pass) once all its chunks are
    # in, before the next phase starts; merged chunks reach the writer in output order.
    turn = threading.Condition()
    emitted = [0]  # copy and combine items handed to the writer so far

    def wait(ready_now: Callable[[], bool]) -> None:
        with turn:
            while not ready_now():
                if stop.is_set():
                    raise _Stopped
                turn.wait(0.1)

    def emit(item: _Item, entry: tuple[object, ...]) -> None:
        wait(lambda: emitted[0] == item.out_seq)
        to_write.put(entry)
        with turn:
            emitted[0] += 1
            turn.notify_all()

    def run_item(item: _Item) -> None:
        task = item.task
        count = item.end - item.start
        if item.kind == "copy":
            info = task.inputs[0]
            raw = item.slot[0][: count * DTYPE_SIZES[info.dtype]]
            if info.dtype != task.out_dtype:
                typed = raw.view(TORCH_DTYPES[info.dtype]).to(TORCH_DTYPES[task.out_dtype])
                release(item.slot)
                emit(item, (item.shard, typed.view(torch.uint8), None))
            else:
                emit(item, (item.shard, raw, item.slot))  # freed once written
            return
        merge, progress, phase = item.merge, item.progress, item.pass_index
        assert merge is not None and progress is not None
        wait(lambda: progress.phase == phase)
        # Asked once the phases before are done (what they found may decide it).
        in_any_order = getattr(merge, "in_any_order", None)
        if workers > 1 and not (callable(in_any_order) and in_any_order(phase)):
            wait(lambda: progress.done == item.index)
        inputs = _typed_inputs(item, dev)
        data = None
        if item.kind == "reduce":
            merge.reduce(phase, inputs, item.start)
        else:
            merged = merge.combine(inputs, item.start)
            out = merged.to(TORCH_DTYPES[task.out_dtype]).reshape(-1)
            if _shares_memory(out, inputs):
                # A combine may return an input itself (one model: multislerp, karcher; no
                # task vectors: the base). Its slot is released below and refilled by the
                # reader before the writer gets to it: write a copy.
                out = out.clone()
            data = out.cpu().contiguous().view(torch.uint8)
            del merged, out
        del inputs
        if item.kind == "combine" or item.release:
            release(item.slot)
        with turn:
            progress.done += 1
            last = progress.done == item.chunks
            turn.notify_all()
        if last:
            if item.kind == "reduce":
                merge.end_pass(phase)
            elif recorder is not None:
                recorder.put(task.name, _record(task, merge))
            with turn:
                progress.phase, progress.done = phase + 1, 0
                turn.notify_all()
        if data is not None:
            emit(item, (item.shard, data, None))

    def compute_loop() -> None:
        try:
            while not stop.is_set():
                try:
                    entry = ready.get(timeout=0.1)
                except queue.Empty:
                    continue
                if entry is _STOP:
                    ready.put(_STOP)  # for the other workers
                    return
                assert isinstance(entry, _Item)
                run_item(entry)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised by the calling thread
            errors.append(exc)
            stop.set()

    # torch's pool leaves two cores to the reader and the writer (their copies out of the page
    # cache and digests are CPU work too): OpenMP's idle workers spin after every parallel op,
    # and on 2 cores with both in the pool that spinning was a third of a model_stock merge's
    # CPU time, taken from the reader and writer.
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (threads - 2) // workers))
    reader = threading.Thread(target=read_loop, name="shardmerge-read", daemon=True)
    writer = threading.Thread(target=write_loop, name="shardmerge-write", daemon=True)
    helpers = [
        threading.Thread(target=compute_loop, name=f"shardmerge-compute-{i}", daemon=True)
        for i in range(1, workers)
    ]
    reader.start()
    writer.start()
    for helper in helpers:
        helper.start()
    try:
        compute_loop()
        for helper in helpers:
            helper.join()
    except BaseException as exc:  # noqa: BLE001 - raised below, after the threads stop
        errors.append(exc)
    finally:
        stop.set()
        for helper in helpers:
            helper.join()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        to_write.put(_STOP)
        writer.join()
        for r in readers:
            r.close_all()
        shards.abort()
        torch.set_num_threads(threads)
    if errors:
        error = errors[0]
        if isinstance(error, ValueError) and not isinstance(error, ShardmergeError):
            # A method refusing what the inputs and parameters make of a tensor (multislerp's
            # 0/0, a tensor too large for the generator): bad input, exit code 2.
            raise InputError(str(error)) from None
        raise error
    return ExecuteResult(shards.sorted_results(), sum(r.bytes_read for r in readers))


def _record(task: TensorTask, merge: TensorMerge) -> dict[str, object]:
    """A tensor's statistics: its per-model weights, and what the method counted (if any)."""
    record: dict[str, object] = {
        "numel": task.inputs[0].numel,
        "weights": [p.get("weight") for p in task.model_params],
    }
    statistics = getattr(merge, "statistics", None)
    if callable(statistics):
        record.update(statistics())
    return record


class _Stopped(Exception):
    """The merge stopped while the reader waited for a slot."""


def _job(plan: MergePlan, task: TensorTask, dev: torch.device) -> TensorJob:
    return TensorJob(
        name=task.name,
        numel=task.inputs[0].numel,
        dtype=TORCH_DTYPES[task.merge_dtype],
        model_params=task.model_params,
        shared=task.shared,
        seed=plan.random_seed,
        device=dev,
        row_len=_row_len(task),
        shape=tuple(task.shape),
        out_dtype=TORCH_DTYPES[task.out_dtype],
    )


def _shares_memory(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``out`` lies in the memory of one of ``inputs`` (a view of a chunk's slot)."""
    ptr = out.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == ptr for x in inputs)


def _row_len(task: TensorTask) -> int:
    """Elements per row: the last dimension; a 1-D (or 0-D) tensor is one row."""
    return task.shape[-1] if len(task.shape) >= 2 else max(1, task.inputs[0].numel)


def _typed_inputs(item: _Item, dev: torch.device) -> list[torch.Tensor]:
    """The chunk of every input as flat tensors of the merge dtype on ``dev``."""
    task = item.task
    count = item.end - item.start
    merge_dtype = TORCH_DTYPES[task.merge_dtype]
    typed = []
    for raw, info in zip(item.slot, task.inputs, strict=False):  # unused positions stay
        x = raw[: count * DTYPE_SIZES[info.dtype]].view(TORCH_DTYPES[info.dtype])
        if dev.type != "cpu":
            x = x.to(dev, non_blocking=True)
        typed.append(x.to(merge_dtype))
    return typed


def _file_refcounts(plan: MergePlan, skip: frozenset[int]) -> Counter[tuple[int, str]]:
    """How many tasks still need each input file, keyed by (model index, file)."""
    counts: Counter[tuple[int, str]] = Counter()
    for index, shard in enumerate(plan.shards):
        if index not in skip:
            for task in shard.tasks:
                for i, info in enumerate(task.inputs):
                    counts[task.model_of(i), info.file] += 1
    return counts


def _page_aligned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-aligned memory: chunks copied as they are (integer tensors, a
    passthrough) then go to an O_DIRECT output straight from it, with no staging copy (whose
    torch copies left the OpenMP workers spinning: most of a passthrough's CPU time)."""
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)
