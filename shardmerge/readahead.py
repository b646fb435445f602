"""Keep the disk busy ahead of the engine's reader, and its consumed input out of the cache.

The engine reads its inputs chunk by chunk, in the plan's order, with one request at a time: on
a cold disk each read waits for the device, and between two reads the device idles while the
chunk is computed and written. :class:`ReadAhead` walks the same reads on a thread of its own,
a bounded window ahead of the reader, and asks the kernel for each of them with
``posix_fadvise(POSIX_FADV_WILLNEED)``: the kernel queues the whole range as asynchronous reads
(many requests in flight, merged into large ones), and returns. By the time the reader gets
there the bytes are in the page cache. The window (:data:`WINDOW_BYTES`) bounds the page cache
the hints fill, not the process's memory: nothing is copied into the process.

Consumed input is dropped from the page cache (``POSIX_FADV_DONTNEED``) once its last read is
done, but only when the inputs do not fit in memory anyway (more than half of what is
available): then keeping them only evicts other pages (the rest of the merge's input, other
programs' files) for no gain. Inputs that fit stay cached, so a second merge of the same models
starts warm. A chunk that is read twice (the sums, then the output of a large tensor) is
dropped after its second read.

Hints never change what is read: a hint that fails (a filesystem without readahead, a file
that is not local) is ignored, and the reader reads as before.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

# How far ahead of the reader the hints run, in input bytes (both models together): enough to
# keep a disk's queue full across a chunk's compute and write (~8 MiB per model per chunk).
WINDOW_BYTES = 256 << 20
# Inputs larger than this fraction of the memory available at the start are dropped from the
# page cache as they are consumed.
DROP_FRACTION = 0.5
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


@dataclass(frozen=True)
class Span:
    """A byte range of an input file that the reader will read: ``offset`` counts from the
    start of the file's data section (after the safetensors header). ``path`` None: not a local
    file, so no hint is given."""

    path: str | None
    offset: int
    length: int


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def should_drop(input_bytes: int, available: int | None) -> bool:
    """Whether consumed input should leave the page cache (see the module's doc)."""
    if _DONTNEED is None or available is None:
        return False
    return input_bytes > DROP_FRACTION * available


def drop(fd: int, offset: int, length: int) -> None:
    """Drop a consumed range from the page cache (a hint: failures are ignored)."""
    if _DONTNEED is None or length <= 0:
        return
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, _DONTNEED)


class ReadAhead:
    """Hints the reads of ``steps`` (per reader step, the spans it reads, in the reader's order)
    up to ``window`` bytes ahead of the reader.

    The reader calls :meth:`advance` with the bytes of each step it finishes, and :meth:`start`
    when it finds itself waiting for the disk (a slow read): from warm memory the hints would
    only cost CPU time. Steps the reader has already read when the hints start are skipped.
    """

    def __init__(self, steps: Iterable[list[Span]], *, window: int = WINDOW_BYTES) -> None:
        self._steps = iter(steps)
        self._window = window
        self._cond = threading.Condition()
        self._hinted = 0  # bytes of the steps hinted (or skipped) so far, in order
        self._consumed = 0  # bytes of the steps the reader has finished
        self._stop = False
        self._files: dict[str, tuple[int, int]] = {}  # path -> (fd, data start)
        self.hinted_bytes = 0  # what the hints asked the kernel for (tests, profiles)
        self._thread = threading.Thread(target=self._run, name="shardmerge-readahead", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.is_alive() or self._thread.ident is not None

    def start(self) -> None:
        """Start hinting (once; a no-op where the platform has no readahead hints)."""
        if _WILLNEED is not None and not self.started:
            self._thread.start()

    def advance(self, nbytes: int) -> None:
        """The reader finished its next step, ``nbytes`` long: the window moves on."""
        with self._cond:
            self._consumed += nbytes
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def _run(self) -> None:
        for spans in self._steps:
            size = sum(s.length for s in spans)
            with self._cond:
                if self._hinted + size <= self._consumed:  # the reader is past it already
                    self._hinted += size
                    continue
                # Wait while the hinted bytes not yet read fill the window (a step larger than
                # the window is hinted once the reader has caught up).
                while not self._stop and self._ahead() > 0 and self._ahead() + size > self._window:
                    self._cond.wait()
                if self._stop:
                    return
                self._hinted += size
            for span in spans:
                self._hint(span)

    def _ahead(self) -> int:
        return self._hinted - self._consumed

    def _hint(self, span: Span) -> None:
        if span.path is None or span.length <= 0:
            return
        try:
            entry = self._files.get(span.path)
            if entry is None:
                fd = os.open(span.path, os.O_RDONLY)
                prefix = os.pread(fd, 8, 0)
                start = 8 + int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
                entry = self._files[span.path] = (fd, start)
            fd, start = entry
            assert _WILLNEED is not None
            os.posix_fadvise(fd, start + span.offset, span.length, _WILLNEED)
            self.hinted_bytes += span.length
        except OSError:
            pass  # only a hint: the reader reads it anyway


def hint_start(spans: Iterable[Span], budget: int = WINDOW_BYTES) -> threading.Thread | None:
    """Hint the first ``budget`` bytes of ``spans`` on a thread, and return it (None where there
    are no hints). For the start of a merge, before the engine exists: while torch imports (many
    small reads of its libraries, seconds from a cold disk), the disk also fetches the first
    chunks of the inputs."""
    if _WILLNEED is None:
        return None
    hints = ReadAhead(_first_bytes(spans, budget), window=budget)
    thread = threading.Thread(target=_hint_all, args=(hints,), name="shardmerge-hint-start")
    thread.daemon = True
    thread.start()
    return thread


def _first_bytes(spans: Iterable[Span], budget: int) -> Iterable[list[Span]]:
    total = 0
    for span in spans:
        if total >= budget:
            return
        length = min(span.length, budget - total)
        total += length
        yield [Span(span.path, span.offset, length)]


def _hint_all(hints: ReadAhead) -> None:
    try:
        hints._run()  # nothing reads behind it: every span is hinted, in order
    finally:
        hints.close()
