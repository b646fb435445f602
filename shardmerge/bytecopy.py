"""Write a plan whose every tensor is a byte copy (a passthrough stack), without torch.

A passthrough without a ``scale`` (mergekit's depth up-scaling, a frankenmerge) changes no
number: each output tensor is one input tensor's stored bytes. Such a run needs no arithmetic, so
it need not import torch either (about a second of CPU, most of a medium passthrough's cost past
the disk). A reader thread fills page-aligned slots from a small fixed pool with ``os.preadv``;
it hashes each slot as it fills it (xxh3 and ``preadv`` both release the GIL), and the calling
thread writes it at the end of its shard (O_DIRECT, straight from the slot:
:class:`shardmerge.shardio.OutputFile`), so the working set is the pool whatever
the model size. The files, digests and resume records are the same bytes as the pass engine's.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import xxhash

from shardmerge import readahead
from shardmerge.errors import ShardmergeError
from shardmerge.plan import COPY_SLOT_BYTES, COPY_SLOTS, MergePlan, copies_only
from shardmerge.shardio import (
    ExecuteResult,
    LocalSource,
    ShardReader,
    ShardResult,
    ShardSource,
    ShardWriter,
    new_digest,
)

__all__ = ["SLOT_BYTES", "SLOTS", "execute_copies"]

# Bytes per slot and slots in the pool (32 MiB in all; plan.py's, for its memory estimate).
SLOT_BYTES = COPY_SLOT_BYTES
SLOTS = COPY_SLOTS


_STOP = object()
# (shard index, a filled slot (None: the shard's opening), byte count, the shard's digest)
Piece = tuple[int, mmap.mmap | None, int, "xxhash.xxh3_128"]


def execute_copies(
    plan: MergePlan,
    sources: Sequence[ShardSource],
    out_dir: Path,
    *,
    labels: Sequence[str] | None = None,
    skip_shards: frozenset[int] = frozenset(),
    on_progress: Callable[[int], None] | None = None,
    on_shard_done: Callable[[int, ShardResult], None] | None = None,
) -> ExecuteResult:
    """Write every shard of ``plan`` (except ``skip_shards``) into ``out_dir`` by copying bytes;
    the plan must be :func:`shardmerge.plan.copies_only`."""
    assert copies_only(plan, skip_shards), "execute_copies: a tensor of the plan is computed"
    names = labels or [f"input {i + 1}" for i in range(len(sources))]
    readers = [ShardReader(src, label) for src, label in zip(sources, names, strict=True)]
    free: queue.Queue[mmap.mmap] = queue.Queue()
    for _ in range(SLOTS):
        free.put(mmap.mmap(-1, SLOT_BYTES))  # page-aligned: written from where it is
    filled: queue.Queue[object] = queue.Queue(maxsize=SLOTS + 1)
    stop = threading.Event()
    errors: list[BaseException] = []
    remaining = _file_refcounts(plan, skip_shards)
    # A stack may copy a tensor twice (a layer used twice): its bytes stay cached until then.
    reads_left = Counter(
        (t.model_of(0), t.inputs[0].name)
        for i, shard in enumerate(plan.shards)
        if i not in skip_shards
        for t in shard.tasks
    )
    # From a cold disk: once a read waits for the device, hints keep it busy ahead of the
    # reader; inputs larger than half the free memory leave the page cache once copied.
    hints = readahead.ReadAhead(_spans(plan, skip_shards, sources))
    drop = readahead.should_drop(plan.input_bytes, readahead.available_memory())
    for model_reader in readers:
        model_reader.on_slow_read = hints.start
        model_reader.drop_consumed = drop

    def take() -> mmap.mmap | None:
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                return free.get(timeout=0.1)
        return None

    def pieces() -> Iterator[Piece]:
        """(shard index, a filled slot or None to open the shard, byte count, the shard's
        digest) in file order. Hashed here, so the digest runs beside the writes rather than
        between them."""
        for index, shard in enumerate(plan.shards):
            if index in skip_shards:
                continue
            digest = new_digest()
            digest.update(shard.header)  # the writer writes it on opening the shard
            yield index, None, 0, digest  # opens it, even if its tensors are all empty
            for task in shard.tasks:
                info = task.inputs[0]
                model = task.model_of(0)
                reads_left[model, info.name] -= 1
                last = reads_left[model, info.name] == 0
                for start, count in _slot_spans(info.nbytes):
                    slot = take()
                    if slot is None:
                        return
                    with memoryview(slot) as view:
                        readers[model].read_into(info, start, view[:count], last=last)
                        digest.update(view[:count])
                    hints.advance(count)
                    yield index, slot, count, digest
                remaining[model, info.file] -= 1
                if remaining[model, info.file] == 0:
                    readers[model].close(info.file)

    def read_loop() -> None:
        try:
            for piece in pieces():
                if stop.is_set():
                    return
                filled.put(piece)
        except BaseException as exc:  # noqa: BLE001 - raised by the calling thread
            errors.append(exc)
        finally:
            filled.put(_STOP)

    writer = ShardWriter(plan, out_dir, on_progress=on_progress, on_shard_done=on_shard_done)

    def write(index: int, slot: mmap.mmap | None, count: int, digest: xxhash.xxh3_128) -> None:
        if slot is None:
            writer.write(index, memoryview(b""), digest=digest)
            return
        with memoryview(slot) as whole:
            view = whole[:count]
            try:
                writer.write(index, view, in_place=True, aligned=True, digest=digest)
            finally:
                view.release()

    reader = threading.Thread(target=read_loop, name="shardmerge-read", daemon=True)
    reader.start()
    try:
        while (entry := filled.get()) is not _STOP:
            assert isinstance(entry, tuple)
            index, data, count, digest = entry
            write(index, data, count, digest)
            if isinstance(data, mmap.mmap):
                free.put(data)
    except BaseException as exc:  # noqa: BLE001 - raised below, after the reader stops
        errors.append(exc)
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                filled.get(timeout=0.05)
        hints.close()
        for r in readers:
            r.close_all()
        writer.abort()
    if errors:
        raise errors[0]
    if writer.open:  # pragma: no cover - the plan's sizes and its tensors disagree
        raise AssertionError("execute_copies: a shard was left unfinished")
    return ExecuteResult(writer.sorted_results(), sum(r.bytes_read for r in readers))


def _spans(
    plan: MergePlan, skip: frozenset[int], sources: Sequence[ShardSource]
) -> Iterator[list[readahead.Span]]:
    """The byte ranges the reader reads, one slot at a time, in its order (for the read-ahead
    hints). Only local files get hints: a streamed shard may not be on the disk yet."""
    paths: dict[tuple[int, str], str | None] = {}
    for index, shard in enumerate(plan.shards):
        if index in skip:
            continue
        for task in shard.tasks:
            info, model = task.inputs[0], task.model_of(0)
            if (model, info.file) not in paths:
                source = sources[model]
                try:
                    local = isinstance(source, LocalSource)
                    paths[model, info.file] = str(source.fetch(info.file)) if local else None
                except ShardmergeError:
                    paths[model, info.file] = None  # the reader reports it
            for start, count in _slot_spans(info.nbytes):
                yield [readahead.Span(paths[model, info.file], info.begin + start, count)]


def _slot_spans(nbytes: int) -> list[tuple[int, int]]:
    """(byte offset, byte count) of each slot-sized read of a tensor of ``nbytes`` bytes: the
    reader's reads and the hints' spans are the same ones."""
    return [(s, min(SLOT_BYTES, nbytes - s)) for s in range(0, nbytes, SLOT_BYTES)]


def _file_refcounts(plan: MergePlan, skip: frozenset[int]) -> Counter[tuple[int, str]]:
    """How many tasks still read each (model, file)."""
    counts: Counter[tuple[int, str]] = Counter()
    for index, shard in enumerate(plan.shards):
        if index not in skip:
            for task in shard.tasks:
                counts[task.model_of(0), task.inputs[0].file] += 1
    return counts
