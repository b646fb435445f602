"""Shard files in and out, without torch: a model's input shards (:class:`ShardReader`) and an
output shard written front to back and hashed as it goes (:class:`OutputFile`).

The engines (:mod:`shardmerge.engine` for SLERP, :mod:`shardmerge.passes` for the other
methods) and the torch-free byte copier (:mod:`shardmerge.bytecopy`, a passthrough) share them.
Reads use ``os.preadv`` into the caller's buffers rather than mappings, so pages of finished
shards never pile up in the process's resident memory; writes go to the disk with O_DIRECT where
the filesystem allows it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import xxhash

from shardmerge import faults, readahead
from shardmerge.errors import CheckpointError, ShardmergeError
from shardmerge.inventory import TensorInfo, read_header, safe_member
from shardmerge.plan import STAGE_BYTES, MergePlan, OutputShard
from shardmerge.vocab import GatheredTensor

if TYPE_CHECKING:
    import torch


class ShardSource(Protocol):
    """Where a model's shard files come from (a local folder, or the Hub just in time)."""

    def fetch(self, filename: str) -> Path: ...

    def release(self, filename: str) -> None: ...


class LocalSource:
    """Shards of a local folder; nothing to release."""

    def __init__(self, folder: Path, label: str) -> None:
        self.folder = folder
        self.label = label

    def fetch(self, filename: str) -> Path:
        return safe_member(self.folder, filename, self.label)

    def release(self, filename: str) -> None:
        pass


# A read of at least this many bytes slower than this rate waited for the disk (copies from the
# page cache run at several GB/s, a disk at one or two): the read-ahead hints start then.
_SLOW_READ_MIN_BYTES = 1 << 22
_SLOW_READ_RATE = 1.5e9


class ShardReader:
    """Open shard files of one model, checked against the plan's header view."""

    def __init__(self, source: ShardSource, label: str) -> None:
        self.source = source
        self.label = label
        self._open: dict[str, tuple[int, int]] = {}  # file -> (fd, data start)
        self._lock = threading.Lock()
        self.bytes_read = 0
        # Consumed ranges leave the page cache (inputs larger than the memory: readahead.py).
        self.drop_consumed = False
        # Called when a read waits for the disk rather than copying from memory.
        self.on_slow_read: Callable[[], None] | None = None
        # Every model's reader, by model index: a re-indexed embedding reads other models' rows.
        self.peers: list[ShardReader] = [self]

    def _fd(self, info: TensorInfo) -> tuple[int, int]:
        # Only the reader thread opens (and releases) files, so fetching (maybe a download)
        # happens outside the lock; the lock guards the table against close_all at the end.
        with self._lock:
            entry = self._open.get(info.file)
        if entry is not None:
            return entry
        path = self.source.fetch(info.file)
        start, tensors = read_header(path, info.file, f"{self.label}: {info.file}")
        actual = tensors.get(info.name)
        planned = (info.dtype, info.shape, info.begin, info.end)
        if actual is None or (actual.dtype, actual.shape, actual.begin, actual.end) != planned:
            raise CheckpointError(
                f"{self.label}: {info.file} changed since it was planned (tensor {info.name!r})"
            )
        entry = (os.open(path, os.O_RDONLY), start)
        with self._lock:
            self._open[info.file] = entry
        return entry

    def read_into(
        self, info: TensorInfo, byte_start: int, buf: memoryview, *, last: bool = True
    ) -> None:
        """Fill ``buf`` from the tensor's bytes at ``byte_start``; ``last``: the merge reads
        these bytes no more (a large tensor's sums pass reads them again for its output)."""
        if isinstance(info, GatheredTensor):
            from shardmerge.rowgather import read_gathered  # torch: only a re-indexed vocabulary

            peers = self.peers
            read_gathered(
                info,
                byte_start,
                buf,
                lambda m, src, start, view, end: peers[m].read_into(src, start, view, last=end),
                last,
            )
            return
        fd, data_start = self._fd(info)
        offset = data_start + info.begin + byte_start
        done = 0
        started = time.perf_counter()
        while done < len(buf):
            try:
                n = os.preadv(fd, [buf[done:]], offset + done)
            except OSError as exc:  # not the pipeline's "writing failed": name the input
                raise ShardmergeError(
                    f"{self.label}: reading {info.file} failed ({exc.strerror or exc})"
                ) from None
            if n <= 0:
                raise CheckpointError(
                    f"{self.label}: {info.file} ended inside tensor {info.name!r} (truncated?)"
                )
            done += n
        self.bytes_read += done
        slow = done < _SLOW_READ_RATE * (time.perf_counter() - started)
        if self.on_slow_read is not None and done >= _SLOW_READ_MIN_BYTES and slow:
            self.on_slow_read()
        if last and self.drop_consumed:
            readahead.drop(fd, offset, done)

    def close(self, file: str) -> None:
        with self._lock:
            entry = self._open.pop(file, None)
        if entry is not None:
            os.close(entry[0])
            self.source.release(file)

    def close_all(self) -> None:
        for file in list(self._open):
            os.close(self._open.pop(file)[0])


# Digest of each finished shard, recorded for --resume. xxh3-128 rather than sha256: it only has
# to notice damage to our own unfinished output, and sha256 of every output byte cost 0.75
# CPU-seconds per 1.3 GB here (a quarter of a 2-core merge's budget); xxh3 costs 0.07.
DIGEST_NAME = "xxh3_128"


def new_digest() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def file_digest(path: Path) -> str:
    """The recorded digest of a whole file, read in 16 MiB pieces."""
    digest = new_digest()
    with path.open("rb") as fh:
        while piece := fh.read(1 << 24):
            digest.update(piece)
    return f"{DIGEST_NAME}:{digest.hexdigest()}"


@dataclass
class ShardResult:
    filename: str
    digest: str  # "xxh3_128:<hex>" of the whole file
    size: int


@dataclass(frozen=True)
class ExecuteResult:
    shards: list[ShardResult]
    bytes_read: int  # input tensor bytes read, both models


# O_DIRECT needs buffers, offsets and lengths aligned to the device's logical block size.
_ALIGN = 4096
_STAGE_BYTES = STAGE_BYTES
# A write at least this big, of block-aligned memory at a block-aligned offset, goes to the disk
# straight from that memory (a chunk slot) instead of being copied into the staging buffer.
_DIRECT_MIN = 1 << 20


class ShardFile:
    """One output shard, written front to back.

    Where the filesystem allows it, the file is opened with O_DIRECT: bytes go from our memory to
    the disk without taking page-cache pages (which would evict the inputs still being read, and
    which cost a fresh page per 4 KiB on virtual machines). Chunks that start on a block boundary
    (the plan aligns the data section, and a model's tensors are whole blocks) are written from
    their slot; the rest is gathered in an aligned staging buffer. Bytes that come as a torch
    tensor are copied into it by torch, which releases the GIL (an mmap slice assignment holds it
    for the whole copy, and stalled the compute threads: 0.17 s per medium merge); the torch-free
    byte copier has no compute threads to stall. Elsewhere (tmpfs, macOS) it is plain buffered
    writes.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.pos = 0  # file offset of the next byte to write (or of the staging buffer's start)
        self.fill = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        self.stage: mmap.mmap | None = None
        self._stage_bytes: torch.Tensor | None = None  # the same memory, for GIL-free copies
        self.fd = -1
        if direct and size >= _STAGE_BYTES:  # small files are not worth the staging copy
            with contextlib.suppress(OSError):
                self.fd = os.open(path, flags | direct, 0o644)
                self.stage = mmap.mmap(-1, _STAGE_BYTES)  # page-aligned anonymous memory
        if self.stage is None:
            self._drop_stage()
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = os.open(path, flags, 0o644)

    def write(
        self,
        view: memoryview,
        tensor: torch.Tensor | None = None,
        *,
        in_place: bool = False,
        aligned: bool = False,
    ) -> None:
        """Append ``view``; ``tensor``: the same bytes as a CPU uint8 tensor, where they are one.
        ``in_place``: they are plain memory of ours (not, say, CUDA-pinned pages, which the
        kernel may refuse to pin for O_DIRECT), so they may go to the disk from where they are;
        ``aligned``: ``view`` starts on a block boundary (known from a tensor's address)."""
        if tensor is not None:
            aligned = tensor.data_ptr() % _ALIGN == 0
        if (
            self.stage is not None
            and in_place
            and aligned
            and len(view) >= _DIRECT_MIN
            and self.fill % _ALIGN == 0
        ):
            if self.fill:
                self._flush()  # whole blocks: the file offset stays aligned
            if self.stage is not None:
                length = len(view) - len(view) % _ALIGN
                if self._write_blocks(view[:length], length):
                    self._drop_stage()
                self.pos += length
                view = view[length:]
                tensor = tensor[length:] if tensor is not None else None
        if self.stage is None:
            _pwrite_all(self.fd, view, self.pos)
            self.pos += len(view)
            return
        while len(view):
            n = min(len(view), _STAGE_BYTES - self.fill)
            if tensor is not None:
                self._stage_tensor(tensor)[self.fill : self.fill + n].copy_(tensor[:n])
                tensor = tensor[n:]
            else:
                self.stage[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == _STAGE_BYTES:
                self._flush()
                if self.stage is None:  # fell back to buffered writes
                    self.write(view)
                    return

    def _stage_tensor(self, like: torch.Tensor) -> torch.Tensor:
        # Made on the first tensor written: torch is imported by then (and never here).
        if self._stage_bytes is None:
            assert self.stage is not None
            self._stage_bytes = sys.modules["torch"].frombuffer(self.stage, dtype=like.dtype)
        return self._stage_bytes

    def _pwrite_direct(self, view: memoryview, pos: int) -> None:
        _pwrite_all(self.fd, view, pos)

    def _write_blocks(self, view: memoryview, nbytes: int) -> bool:
        """Write the first ``nbytes`` of ``view`` at ``pos`` with O_DIRECT (all of ``view``: its
        whole blocks). Returns True when the filesystem refused it (EINVAL, though it took
        O_DIRECT at open, or could not pin the memory): they are written buffered, and so is the
        rest of the file."""
        try:
            self._pwrite_direct(view, self.pos)
            return False
        except OSError as exc:
            # EFAULT: the kernel would not pin the pages for direct I/O (memory another driver
            # pinned, say); the same bytes go through the page cache instead.
            if exc.errno not in (errno.EINVAL, errno.EFAULT):
                raise
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY)
        _pwrite_all(self.fd, view[:nbytes], self.pos)
        return True

    def _flush(self) -> None:
        assert self.stage is not None
        length = -(-self.fill // _ALIGN) * _ALIGN  # the last block is padded, then truncated
        refused = self._write_blocks(memoryview(self.stage)[:length], self.fill)
        if refused:
            self._drop_stage()
        self.pos += self.fill
        self.fill = 0

    def _drop_stage(self) -> None:
        self._stage_bytes = None  # first: it holds an export of the mmap
        if self.stage is not None:
            self.stage.close()
            self.stage = None

    def close(self) -> None:
        if self.stage is not None and self.fill:
            self._flush()
        self._drop_stage()
        os.ftruncate(self.fd, self.size)
        os.close(self.fd)

    def abort(self) -> None:
        self._drop_stage()
        os.close(self.fd)


@dataclass
class OutputFile:
    """An output shard being written, hashed as it goes (writes arrive in file order)."""

    path: Path
    shard: OutputShard
    file: ShardFile
    hasher: xxhash.xxh3_128 = field(default_factory=new_digest)
    written: int = 0
    # The caller updates ``hasher`` itself, with every byte in file order, before it appends
    # them (the byte copier hashes on its reader thread, beside the writes).
    hashed_by_caller: bool = False

    def append(
        self,
        view: memoryview,
        tensor: torch.Tensor | None,
        *,
        in_place: bool,
        aligned: bool = False,
    ) -> ShardResult | None:
        """Write and hash the next bytes (they arrive in file order); once the shard's last byte
        is written, close it and return its result.

        No fsync here: resume re-hashes every recorded shard, so a shard lost to a power cut is
        redone, and a killed process loses nothing the kernel holds (the output is synced once,
        before it is renamed into place)."""
        self.file.write(view, tensor, in_place=in_place, aligned=aligned)
        if not self.hashed_by_caller:
            self.hasher.update(view)
        self.written += len(view)
        faults.reached("chunk-written")
        if self.written < self.shard.file_bytes:
            return None
        self.file.close()
        digest = f"{DIGEST_NAME}:{self.hasher.hexdigest()}"
        return ShardResult(self.shard.filename, digest, self.written)


class ShardWriter:
    """A plan's output shards being written, each front to back: a shard's file opens, with its
    header, at its first write, and is closed, reported (``on_shard_done``) and counted in
    :attr:`results` at its last byte. One thread writes; the engines put their chunks in order."""

    def __init__(
        self,
        plan: MergePlan,
        out_dir: Path,
        *,
        on_progress: Callable[[int], None] | None = None,
        on_shard_done: Callable[[int, ShardResult], None] | None = None,
    ) -> None:
        self.plan = plan
        self.out_dir = out_dir
        self.on_progress = on_progress
        self.on_shard_done = on_shard_done
        self.results: list[ShardResult] = []
        self.open: dict[int, OutputFile] = {}  # shards begun and not finished, by index
        self._finished: set[int] = set()

    def position(self, index: int) -> int:
        """The file offset of shard ``index``'s next byte (its header is written on opening)."""
        out = self.open.get(index)
        if out is not None:
            return out.file.pos + out.file.fill
        shard = self.plan.shards[index]
        return shard.file_bytes if index in self._finished else len(shard.header)

    def write(
        self,
        index: int,
        view: memoryview,
        tensor: torch.Tensor | None = None,
        *,
        in_place: bool = False,
        aligned: bool = False,
        digest: xxhash.xxh3_128 | None = None,
    ) -> None:
        """Append ``view`` to shard ``index`` (see :meth:`OutputFile.append`), opening the shard
        first (its header) if this is its first write; ``digest``: the shard's hash, header
        included, kept up to date by the caller (given with the shard's first write)."""
        out = self.open.get(index)
        if out is None and index not in self._finished:
            out = self._begin(index, digest)
        if out is None:
            # A shard of empty tensors is complete with its header; nothing more may come.
            assert not len(view), f"bytes past the end of {self.plan.shards[index].filename}"
            return
        self._after(index, out.append(view, tensor, in_place=in_place, aligned=aligned))
        if self.on_progress is not None and len(view):
            self.on_progress(len(view))

    def _begin(self, index: int, digest: xxhash.xxh3_128 | None) -> OutputFile | None:
        """Open shard ``index`` and write its header; None if that finished it."""
        shard = self.plan.shards[index]
        path = self.out_dir / shard.filename
        file = ShardFile(path, shard.file_bytes)
        out = self.open[index] = (
            OutputFile(path, shard, file)
            if digest is None
            else OutputFile(path, shard, file, digest, hashed_by_caller=True)
        )
        self._after(index, out.append(memoryview(shard.header), None, in_place=False))
        return self.open.get(index)

    def _after(self, index: int, result: ShardResult | None) -> None:
        if result is None:
            return
        self.results.append(result)
        del self.open[index]
        self._finished.add(index)
        if self.on_shard_done is not None:
            self.on_shard_done(index, result)
        faults.reached("shard-done")

    def abort(self) -> None:
        """Close the unfinished shards' files (a failed merge; they stay for nobody)."""
        for out in self.open.values():
            out.file.abort()

    def sorted_results(self) -> list[ShardResult]:
        return sorted(self.results, key=lambda r: r.filename)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
