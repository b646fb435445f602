"""Execute a MergePlan: read input chunks, SLERP them, write them at their planned offsets.

Four threads overlap (pread, torch kernels, xxhash and pwrite all release the GIL): a reader
fills input slots from a small fixed pool, in the plan's order; two compute threads (the main
thread and one more) take the steps in that order, whatever their kind: a chunk's share of a
tensor's sums, or, once a tensor's sums are all in, a chunk of its output, computed into an
output buffer from a second pool; a writer puts the output chunks back in file order and writes
them at their precomputed offsets, straight from their buffers (O_DIRECT). Every buffer comes
from a pool and is reused, so the working set is a few chunks whatever the model size; input
bytes are read with ``os.preadv`` rather than mapped, so pages of finished shards never pile up
in the process's resident memory.

The math converts to float32 a cache-sized piece at a time (``slerp.SUB_NUMEL``) straight from
the raw input bytes, so the only float32 memory is a 4 MiB scratch pair per compute thread.
A tensor of at most ``RESIDENT_NUMEL`` elements keeps its raw chunks in their slots between its
sums and its output (read once); a larger one is read twice (sums, then output).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import mmap
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch

from shardmerge import readahead, slerp
from shardmerge.errors import NonFiniteInputError, ShardmergeError
from shardmerge.inventory import DTYPE_SIZES
from shardmerge.mergestats import Recorder, slerp_record
from shardmerge.plan import (
    CHUNK_NUMEL,
    RESIDENT_NUMEL,
    MergePlan,
    TensorTask,
    chunk_buffers,
)
from shardmerge.shardio import (
    ExecuteResult,
    LocalSource,
    ShardReader,
    ShardResult,
    ShardSource,
    ShardWriter,
)

_T = TypeVar("_T")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64,
}  # fmt: skip


# copy_a / copy_b: t is 0 or 1, bytes pass through. load + emit: the tensor is resident: its
# load steps read its chunks and add up the sums, each emit step computes the output of the
# matching load step's slot. stats + combine: a larger tensor is read twice (sums, then output).
# int: integer/bool tensors, read whole.
Kind = Literal["copy_a", "copy_b", "load", "emit", "stats", "combine", "int"]


@dataclass
class _Slot:
    """One chunk's raw input bytes, both models. A chunk's output has a buffer of its own (from
    another pool): the inputs' slot is free as soon as the output is computed, while the output
    may wait a few milliseconds for the disk (it is written straight from its buffer)."""

    raw_a: torch.Tensor
    raw_b: torch.Tensor


class _Sums:
    """A float tensor's a.b, a.a and b.b, one part per chunk: the parts may be computed by either
    compute thread, in any order, and are added up in chunk order, so the result never depends
    on which thread did what."""

    def __init__(self, chunks: int) -> None:
        self.parts: list[slerp.SlerpStats | None] = [None] * chunks
        self._missing = chunks
        self._lock = threading.Lock()
        self._complete = threading.Event()
        self._total: slerp.SlerpStats | None = None

    def put(self, chunk: int, part: slerp.SlerpStats) -> None:
        self.parts[chunk] = part
        with self._lock:
            self._missing -= 1
            if self._missing == 0:
                self._complete.set()

    def wait(self, stop: threading.Event) -> bool:
        """Wait for every chunk's part (the other compute thread may be adding the last ones);
        False if the merge stops meanwhile."""
        while not self._complete.wait(0.05):
            if stop.is_set():
                return False
        return True

    def total(self) -> slerp.SlerpStats:
        with self._lock:
            if self._total is None:
                total = slerp.SlerpStats()
                for part in self.parts:
                    assert part is not None, "a chunk's sums are missing"
                    total.add(part)
                self._total = total
            return self._total


@dataclass
class _Step:
    task: TensorTask
    shard: int
    kind: Kind
    start: int  # element range
    end: int
    last: bool  # the task's final step
    sums: _Sums | None = None  # float tensors that are computed (not copied)
    slot: _Slot | None = None
    out: torch.Tensor | None = None  # output steps that compute: raw output bytes
    whole_a: bytearray | None = None  # integer tensors are read whole (they are tiny)
    whole_b: bytearray | None = None
    seq: int = -1  # output steps' place in the order of writing


def _steps(plan: MergePlan, skip_shards: frozenset[int], slots: int) -> Iterator[_Step]:
    """The steps in the reader's order: each task's sums steps, then its output steps; but a
    resident tensor's output steps wait behind the next task's sums steps when both tasks'
    resident chunks fit in the slots together. A compute thread then has sums to add while the
    other adds a tensor's last ones, instead of waiting for them before it can start that
    tensor's output. Output steps keep the file order; input files are read in task order
    still (the held-back steps read nothing), as streaming from the Hub expects."""
    resident = _resident_numel(slots)
    held_back: list[_Step] = []  # the previous task's output steps
    held_slots = 0  # the slots its resident chunks keep until then (0: not resident)
    for index, shard in enumerate(plan.shards):
        if index in skip_shards:
            continue
        for task in shard.tasks:
            steps = list(_task_steps(task, index, resident))
            sums = [s for s in steps if s.kind in ("load", "stats")]
            loads = sum(1 for s in sums if s.kind == "load")
            if sums and held_slots and held_slots + loads <= slots:
                yield from sums
                yield from held_back
            else:
                yield from held_back
                yield from sums
            held_back, held_slots = steps[len(sums) :], loads
    yield from held_back


def _chunk_numel() -> int:
    # Whole blocks per chunk, so the block partition (and so every sum) is the same as in
    # shardmerge.slerp.slerp with the same chunk size.
    return max(slerp.BLOCK, CHUNK_NUMEL - CHUNK_NUMEL % slerp.BLOCK)


def _resident_numel(slots: int) -> int:
    # A resident tensor holds all its chunks' slots at once: never more chunks than slots.
    return min(RESIDENT_NUMEL, slots * _chunk_numel())


def _task_steps(task: TensorTask, shard: int, resident: int) -> Iterator[_Step]:
    n = task.a.numel
    step = _chunk_numel()
    spans = [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]
    same_dtype = task.input_dtype in (None, task.a.dtype)
    if not task.is_float:
        yield _Step(task, shard, "int", 0, n, True)
        return
    if task.t in (0.0, 1.0) and same_dtype:
        kind: Kind = "copy_a" if task.t == 0.0 else "copy_b"
        for i, (s, e) in enumerate(spans):
            yield _Step(task, shard, kind, s, e, i == len(spans) - 1)
        return
    sums = _Sums(len(spans))
    first: Kind = "load" if n <= resident else "stats"
    second: Kind = "emit" if n <= resident else "combine"
    for s, e in spans:
        yield _Step(task, shard, first, s, e, False, sums)
    for i, (s, e) in enumerate(spans):
        yield _Step(task, shard, second, s, e, i == len(spans) - 1, sums)


_STOP = object()


def execute_plan(
    plan: MergePlan,
    source_a: ShardSource,
    source_b: ShardSource,
    out_dir: Path,
    *,
    device: str = "cpu",
    skip_shards: frozenset[int] = frozenset(),
    on_progress: Callable[[int], None] | None = None,
    on_shard_done: Callable[[int, ShardResult], None] | None = None,
    host_memory: mmap.mmap | None = None,
    recorder: Recorder | None = None,
) -> ExecuteResult:
    """Write every shard of ``plan`` (except ``skip_shards``) into ``out_dir``.

    Args:
        device: "cpu" or a CUDA device; the math runs there, I/O stays on the host.
        on_progress: called with output bytes produced, for progress bars.
        on_shard_done: called as each shard is complete and flushed, e.g. to record resume state.
        host_memory: memory to carve the chunk slots from (CPU only; too small: allocated here).
        recorder: gets each tensor's statistics (its sums and t), as its first output chunk is
            computed (so before its shard is done).
    """
    reader_a = ShardReader(source_a, "model A")
    reader_b = ShardReader(source_b, "model B")
    reader_a.peers = reader_b.peers = [reader_a, reader_b]
    dev = torch.device(device)
    remaining = _file_refcounts(plan, skip_shards)

    buffers = chunk_buffers(plan)
    chunk = _chunk_numel()
    free: queue.Queue[_Slot] = queue.Queue()
    free_out: queue.Queue[torch.Tensor] = queue.Queue()
    sizes = (chunk * buffers.in_itemsize,) * 2 + (chunk * buffers.out_itemsize,)
    pool = None
    registered = None
    if host_memory is not None and len(host_memory) >= buffers.slots * sum(sizes):
        pool = torch.frombuffer(host_memory, dtype=torch.uint8)
        if dev.type == "cuda":
            registered = _register_pinned(pool)
            if registered is None:  # CUDA would not pin it: torch's own pinned memory instead
                pool = None
    # Slots carved from memory we mapped are plain pages (pinned for CUDA by registration), so
    # they may go to the disk straight from where they are (O_DIRECT); torch's own pinned
    # allocations may not (the kernel may refuse to pin such pages for direct I/O).
    own_memory = pool is not None
    pin = dev.type == "cuda" and pool is None
    start = 0
    for _ in range(buffers.slots):
        raw = []
        for size in sizes:
            if pool is not None:
                raw.append(pool[start : start + size])
                start += size
            else:
                raw.append(torch.empty(size, dtype=torch.uint8, pin_memory=pin))
        free.put(_Slot(raw[0], raw[1]))
        free_out.put(raw[2])
    ready: queue.Queue[object] = queue.Queue(maxsize=buffers.slots)
    to_write: queue.Queue[object] = queue.Queue(maxsize=buffers.slots)
    errors: list[BaseException] = []
    stop = threading.Event()

    def release_inputs(task: TensorTask) -> None:
        for side, reader, info in (("a", reader_a, task.a), ("b", reader_b, task.b)):
            remaining[side, info.file] -= 1
            if remaining[side, info.file] == 0:
                reader.close(info.file)

    # Read-ahead hints for the same reads, started when a read waits for the disk.
    hints = readahead.ReadAhead(_read_spans(plan, skip_shards, buffers.slots, (source_a, source_b)))
    drop_consumed = readahead.should_drop(plan.input_bytes, readahead.available_memory())
    for model_reader in (reader_a, reader_b):
        model_reader.on_slow_read = hints.start
        model_reader.drop_consumed = drop_consumed

    def read_loop() -> None:
        held: list[_Slot] = []  # a resident tensor's slots, from its load to its emit steps
        seq = 0
        try:
            for step in _steps(plan, skip_shards, buffers.slots):
                if stop.is_set():
                    return
                if step.kind == "emit":
                    step.slot = held.pop(0)
                else:
                    hints.advance(_read_step(step, reader_a, reader_b, free, stop))
                if step.kind == "load" and step.slot is not None:
                    held.append(step.slot)
                if step.slot is None and step.kind != "int":
                    return  # stopped while waiting for a buffer
                if _computes_output(step):
                    # Taken here, in the order of writing, so the writer always gets the next
                    # chunk it needs (taken by the compute threads, out of order, the buffers
                    # could all wait behind a chunk that has none).
                    step.out = _take(free_out, stop)
                    if step.out is None:
                        return
                if step.kind not in ("load", "stats"):
                    step.seq, seq = seq, seq + 1
                if step.last:
                    release_inputs(step.task)  # every byte of the task is in memory now
                ready.put(step)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
        finally:
            ready.put(_STOP)

    shards = ShardWriter(plan, out_dir, on_progress=on_progress, on_shard_done=on_shard_done)

    def write(
        shard_index: int,
        offset: int,
        data: object,
        slot: _Slot | None,
        out_buffer: torch.Tensor | None,
    ) -> None:
        assert offset == shards.position(shard_index), "writes must arrive in file order"
        tensor = data if isinstance(data, torch.Tensor) else None
        view = bytes_view(tensor) if tensor is not None else data
        assert isinstance(view, memoryview)
        shards.write(shard_index, view, tensor, in_place=own_memory)
        if slot is not None:
            free.put(slot)
        if out_buffer is not None:
            free_out.put(out_buffer)

    def write_loop() -> None:
        # Output steps arrive from two compute threads, a little out of order: they are put
        # back in order here (at most one per slot waits).
        waiting: dict[int, tuple[int, int, object, _Slot | None, torch.Tensor | None]] = {}
        next_seq = 0
        try:
            for item in _until_stop(to_write):
                assert isinstance(item, tuple)
                waiting[item[0]] = item[1:]
                while next_seq in waiting:
                    write(*waiting.pop(next_seq))
                    next_seq += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()
            # Keep draining so the compute threads never block on a full queue.
            while to_write.get() is not _STOP:
                pass

    sub = slerp.sub_numel(dev)
    # Two compute threads take the steps in order, whatever their kind: sums (any chunk, any
    # thread: _Sums adds them up in chunk order) and outputs (once the tensor's sums are all in).
    # Each takes half of torch's CPU threads (on 2 cores: one each, which also keeps OpenMP's
    # idle workers from spinning on the cores the reader and writer need).
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads // 2))

    def compute_loop() -> None:
        # On a GPU each compute thread has a stream of its own: one thread's copies to the device
        # run while the other's kernels and copies back do (on one stream they would take turns).
        # Each thread waits only for its own stream (the sums it reads, the output it writes).
        with _own_stream(dev):
            _compute_steps()

    def _compute_steps() -> None:
        scratch = slerp.pair_buffer(sub or chunk, dev)
        try:
            while (item := ready.get()) is not _STOP and not stop.is_set():
                assert isinstance(item, _Step)
                step = item
                if step.kind in ("stats", "load"):
                    _compute(step, scratch, sub, dev, recorder)
                    if step.kind == "stats":
                        assert step.slot is not None
                        free.put(step.slot)  # a "load" slot waits for the matching emit step
                    continue
                if step.sums is not None and not step.sums.wait(stop):
                    break
                data, _ = _compute(step, scratch, sub, dev, recorder)
                offset = len(plan.shards[step.shard].header) + step.task.out_begin
                offset += step.start * DTYPE_SIZES[step.task.out_dtype]
                inputs = step.slot
                if step.out is not None and inputs is not None:
                    free.put(inputs)  # the output is in its own buffer
                    inputs = None
                to_write.put((step.seq, step.shard, offset, data, inputs, step.out))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()
        finally:
            # For the other compute thread, should it wait for a step. Never blocking: a full
            # queue (the merge stopped early) has steps for it, and it sees the stop anyway.
            with contextlib.suppress(queue.Full):
                ready.put_nowait(_STOP)

    reader = threading.Thread(target=read_loop, name="shardmerge-read", daemon=True)
    computer = threading.Thread(target=compute_loop, name="shardmerge-compute", daemon=True)
    writer = threading.Thread(target=write_loop, name="shardmerge-write", daemon=True)
    for thread in (reader, computer, writer):
        thread.start()
    # Nothing in the loop makes reference cycles; a collection walking torch's many objects
    # only stalls the thread that feeds the others.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        compute_loop()
    finally:
        if gc_was_enabled:
            gc.enable()
        stop.set()
        # Unblock the reader if it waits on a full queue, then stop the other compute thread
        # (it may wait for a step) and the writer.
        while reader.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        with contextlib.suppress(queue.Empty):
            while True:
                ready.get_nowait()
        ready.put(_STOP)
        computer.join()
        to_write.put(_STOP)
        writer.join()
        torch.set_num_threads(threads)
        hints.close()
        reader_a.close_all()
        reader_b.close_all()
        shards.abort()
        if registered is not None:
            registered()  # every copy from or into the slots is done: the threads are joined
    if errors:
        raise errors[0]
    return ExecuteResult(shards.sorted_results(), reader_a.bytes_read + reader_b.bytes_read)


def _own_stream(dev: torch.device) -> contextlib.AbstractContextManager[object]:
    """A new CUDA stream as the calling thread's current stream (CPU: nothing)."""
    if dev.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(dev))


def _register_pinned(pool: torch.Tensor) -> Callable[[], None] | None:
    """Pin ``pool`` (memory we mapped) for CUDA copies with cudaHostRegister; returns the call
    that unregisters it, or None where CUDA refuses (then the caller allocates pinned memory).

    Registered pages stay ordinary anonymous memory, so output chunks are written to the disk
    straight from them (O_DIRECT), as on the CPU; the slots also need no second allocation."""
    cudart = torch.cuda.cudart()
    address, size = pool.data_ptr(), pool.numel()
    success = cudart.cudaError.success
    if cudart.cudaHostRegister(address, size, 0) != success:
        return None

    def unregister() -> None:
        torch.cuda.synchronize()
        cudart.cudaHostUnregister(address)

    return unregister


def _until_stop(items: queue.Queue[object]) -> Iterator[object]:
    while (item := items.get()) is not _STOP:
        yield item


def _file_refcounts(plan: MergePlan, skip: frozenset[int]) -> Counter[tuple[str, str]]:
    """How many tasks still need each input file, keyed by ("a" | "b", file)."""
    counts: Counter[tuple[str, str]] = Counter()
    for index, shard in enumerate(plan.shards):
        if index not in skip:
            for task in shard.tasks:
                counts["a", task.a.file] += 1
                counts["b", task.b.file] += 1
    return counts


def bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU uint8 tensor (pinned or not), without numpy.

    The caller keeps ``tensor`` alive while the view is used (slots own their buffers)."""
    assert tensor.dtype == torch.uint8 and tensor.is_contiguous() and tensor.device.type == "cpu"
    if tensor.numel() == 0:
        return memoryview(bytearray())
    array = (ctypes.c_char * tensor.numel()).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def _read_step(
    step: _Step,
    reader_a: ShardReader,
    reader_b: ShardReader,
    free: queue.Queue[_Slot],
    stop: threading.Event,
) -> int:
    """Read the step's input bytes (into a free slot); returns how many (0: stopped)."""
    task = step.task
    if step.kind == "int":
        step.whole_a = bytearray(task.a.nbytes)
        step.whole_b = bytearray(task.b.nbytes)
        reader_a.read_into(task.a, 0, memoryview(step.whole_a))
        reader_b.read_into(task.b, 0, memoryview(step.whole_b))
        return task.a.nbytes + task.b.nbytes
    step.slot = _take(free, stop)
    if step.slot is None:
        return 0
    count = step.end - step.start
    last = step.kind != "stats"  # a large tensor's sums: its output reads the bytes again
    nbytes = 0
    if step.kind != "copy_b":
        size = DTYPE_SIZES[task.a.dtype]
        view = bytes_view(step.slot.raw_a)[: count * size]
        reader_a.read_into(task.a, step.start * size, view, last=last)
        nbytes += len(view)
    if step.kind != "copy_a":
        size = DTYPE_SIZES[task.b.dtype]
        view = bytes_view(step.slot.raw_b)[: count * size]
        reader_b.read_into(task.b, step.start * size, view, last=last)
        nbytes += len(view)
    return nbytes


def _read_spans(
    plan: MergePlan, skip: frozenset[int], slots: int, sources: tuple[ShardSource, ShardSource]
) -> Iterator[list[readahead.Span]]:
    """The byte ranges of every reading step, in the reader's order (for the read-ahead hints).
    Only local files get hints: a streamed shard may not be on the disk yet."""
    paths: dict[tuple[int, str], str | None] = {}

    def path(side: int, file: str) -> str | None:
        if (side, file) not in paths:
            source = sources[side]
            local = isinstance(source, LocalSource)
            try:
                paths[side, file] = str(source.fetch(file)) if local else None
            except ShardmergeError:
                paths[side, file] = None  # the reader reports it
        return paths[side, file]

    for step in _steps(plan, skip, slots):
        if step.kind == "emit":  # its chunks are in their slots already
            continue
        spans = []
        task = step.task
        for side, info, wanted in (
            (0, task.a, step.kind != "copy_b"),
            (1, task.b, step.kind != "copy_a"),
        ):
            if not wanted:
                continue
            size = DTYPE_SIZES[info.dtype]
            if step.kind == "int":
                begin, length = info.begin, info.nbytes
            else:
                begin, length = info.begin + step.start * size, (step.end - step.start) * size
            spans.append(readahead.Span(path(side, info.file), begin, length))
        yield spans


def _take(pool: queue.Queue[_T], stop: threading.Event) -> _T | None:
    """A buffer from ``pool`` once one is free; None if the merge stops meanwhile."""
    while not stop.is_set():
        with contextlib.suppress(queue.Empty):
            return pool.get(timeout=0.1)
    return None


def _computes_output(step: _Step) -> bool:
    """Whether the step's output is computed into a buffer of its own (a copy of the same dtype
    is written from its input slot; integer tensors are tiny and get a fresh tensor)."""
    if step.kind in ("emit", "combine"):
        return True
    info = step.task.a if step.kind == "copy_a" else step.task.b
    return step.kind in ("copy_a", "copy_b") and info.dtype != step.task.out_dtype


def _inputs(
    slot: _Slot, task: TensorTask, count: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's raw bytes of both inputs as typed flat tensors on ``dev``."""
    typed = []
    for raw, info in ((slot.raw_a, task.a), (slot.raw_b, task.b)):
        tensor = raw[: count * DTYPE_SIZES[info.dtype]].view(TORCH_DTYPES[info.dtype])
        if dev.type != "cpu":
            tensor = tensor.to(dev, non_blocking=True)
        typed.append(tensor)
    return typed[0], typed[1]


def _compute(
    step: _Step,
    scratch: torch.Tensor,
    sub: int,
    dev: torch.device,
    recorder: Recorder | None = None,
) -> tuple[object, int]:
    """Run one step; returns (bytes-like or uint8 tensor to write, output byte count)."""
    task = step.task
    out_code = task.out_dtype
    out_size = DTYPE_SIZES[out_code]
    count = step.end - step.start
    if step.kind == "int":
        assert step.whole_a is not None and step.whole_b is not None
        a = _from_bytes(step.whole_a, task.a.dtype)
        b = _from_bytes(step.whole_b, task.b.dtype)
        merged = slerp.merge_integer(a, b.to(a.dtype), task.t)
        data = merged.contiguous().view(torch.uint8)
        return data, data.numel()
    slot = step.slot
    assert slot is not None
    nbytes = count * out_size
    if step.kind in ("copy_a", "copy_b"):
        if recorder is not None and step.start == 0:
            recorder.put(task.name, {"numel": task.a.numel, "t": task.t})
        raw = slot.raw_a if step.kind == "copy_a" else slot.raw_b
        info = task.a if step.kind == "copy_a" else task.b
        if info.dtype == out_code:
            return raw[:nbytes], nbytes  # the bytes pass through untouched
        assert step.out is not None
        src = raw[: count * DTYPE_SIZES[info.dtype]].view(TORCH_DTYPES[info.dtype])
        step.out[:nbytes].view(TORCH_DTYPES[out_code]).copy_(src)
        return step.out[:nbytes], nbytes
    a, b = _inputs(slot, task, count, dev)
    round_to = None if task.input_dtype is None else TORCH_DTYPES[task.input_dtype]
    assert step.sums is not None
    if step.kind in ("stats", "load"):
        part = slerp.SlerpStats()
        slerp.accumulate_chunk(part, a, b, scratch, sub=sub, round_to=round_to)
        step.sums.put(step.start // _chunk_numel(), part)
        return None, 0
    assert step.out is not None
    out_raw = step.out[:nbytes]
    stats = step.sums.total()
    _check_finite(stats, task)
    s0, s1 = slerp.coefficients(stats, task.t)
    if recorder is not None and step.start == 0:  # the tensor's sums are all in
        record = slerp_record(task.a.numel, task.t, stats.dot, stats.sq_a, stats.sq_b)
        recorder.put(task.name, record)
    typed_out = out_raw.view(TORCH_DTYPES[out_code])
    if dev.type == "cpu":
        slerp.combine_chunk(typed_out, a, b, s0, s1, scratch, sub=sub, round_to=round_to)
    else:
        result = torch.empty(count, dtype=TORCH_DTYPES[out_code], device=dev)
        slerp.combine_chunk(result, a, b, s0, s1, scratch, sub=sub, round_to=round_to)
        typed_out.copy_(result)
    return out_raw, nbytes


def _from_bytes(data: bytearray, dtype: str) -> torch.Tensor:
    if not data:  # torch.frombuffer rejects empty buffers
        return torch.empty(0, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(data, dtype=TORCH_DTYPES[dtype])


def _check_finite(stats: slerp.SlerpStats, task: TensorTask) -> None:
    if stats.is_finite():
        return
    raise NonFiniteInputError(task.name, "a" if not math.isfinite(stats.sq_a) else "b")
