"""Disk rates for ``plan``'s wall-time estimate: measured on request, cached per device.

``plan --measure-disk`` reads the inputs' largest file and writes a scratch file next to the
output with ``O_DIRECT`` (past the page cache: the disk's own rate), a second or two per
device, and keeps the rates in ``$XDG_CACHE_HOME/shardmerge/disk-rates.json`` (default
``~/.cache``), keyed by the device's id and name. A plain ``plan`` only reads that file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

BLOCK_BYTES = 8 << 20  # one request: large, as the merge's own reads and writes are
THREADS = 4  # requests in flight: a disk's rate needs a queue, as the merge keeps one
READ_LIMIT_BYTES = 1 << 30
WRITE_BYTES = 512 << 20
TIME_LIMIT_S = 1.5  # per measurement: plan --measure-disk stays a few seconds at most


@dataclass(frozen=True)
class DiskRates:
    read_bytes_per_s: float | None
    write_bytes_per_s: float | None
    measured: str  # when (UTC date)


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "shardmerge" / "disk-rates.json"


def device_key(path: Path) -> str:
    """The block device holding ``path`` (its nearest existing folder): "vda (253:0)"."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    dev = os.stat(path).st_dev
    ident = f"{os.major(dev)}:{os.minor(dev)}"
    name = ""
    with contextlib.suppress(OSError):
        uevent = Path(f"/sys/dev/block/{ident}/uevent").read_text()
        name = next((ln[8:] for ln in uevent.splitlines() if ln.startswith("DEVNAME=")), "")
    return f"{name} ({ident})" if name else ident


def load_rates() -> dict[str, DiskRates]:
    """The cached rates by device; none when the file is missing or unreadable."""
    try:
        data = json.loads(cache_file().read_text())
        return {
            key: DiskRates(
                value.get("read_bytes_per_s"), value.get("write_bytes_per_s"), value["measured"]
            )
            for key, value in data.items()
        }
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def save_rates(key: str, rates: DiskRates) -> None:
    data = {k: v.__dict__ for k, v in load_rates().items()}
    # A rate not measured this time (no file to read, no output named) keeps its last value.
    new = {k: v for k, v in rates.__dict__.items() if v is not None}
    data[key] = {**data.get(key, {}), **new}
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def measure(read_file: Path | None, write_dir: Path | None) -> DiskRates:
    """Time direct reads of ``read_file`` and direct writes of a scratch file in ``write_dir``
    (each optional), ``THREADS`` requests in flight, at most ``TIME_LIMIT_S`` each."""
    read = _timed_read(read_file) if read_file is not None else None
    write = _timed_write(write_dir) if write_dir is not None else None
    return DiskRates(read, write, time.strftime("%Y-%m-%d", time.gmtime()))


def estimate_seconds(
    reads: Mapping[str, int], writes: Mapping[str, int], rates: Mapping[str, DiskRates]
) -> float | None:
    """Wall time for these bytes per device: reads and writes of one device add up (they share
    it), devices work at once. None when a device's rate is unknown."""
    total = 0.0
    for key in set(reads) | set(writes):
        rate = rates.get(key)
        seconds = 0.0
        for nbytes, per_s in (
            (reads.get(key, 0), rate.read_bytes_per_s if rate else None),
            (writes.get(key, 0), rate.write_bytes_per_s if rate else None),
        ):
            if nbytes and not per_s:
                return None
            seconds += nbytes / per_s if nbytes and per_s else 0.0
        total = max(total, seconds)
    return total


def _open_direct(path: Path, flags: int) -> int:
    """Open past the page cache; where the filesystem refuses O_DIRECT (tmpfs), plainly."""
    try:
        return os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return os.open(path, flags, 0o600)


def _in_threads(work: list[int], step: object) -> tuple[int, float]:
    """Run ``step(offset, buffer)`` over ``work`` offsets on THREADS threads: (bytes, start)."""
    lock = threading.Lock()
    done: list[int] = []
    start = time.perf_counter()

    def run() -> None:
        buffer = mmap.mmap(-1, BLOCK_BYTES)  # page-aligned, as O_DIRECT needs
        while time.perf_counter() - start < TIME_LIMIT_S:
            with lock:
                if not work:
                    break
                offset = work.pop(0)
            n = step(offset, buffer)  # type: ignore[operator]
            with lock:
                done.append(n)
        buffer.close()

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done), start


def _timed_read(path: Path) -> float | None:
    size = min(path.stat().st_size, READ_LIMIT_BYTES)
    # Small inputs: smaller requests (O_DIRECT wants them in whole 4 KiB pages).
    block = min(BLOCK_BYTES, size // (4 * THREADS) // 4096 * 4096)
    if block == 0:  # too small to say anything of the disk
        return None
    fd = _open_direct(path, os.O_RDONLY)
    try:
        nbytes, start = _in_threads(
            [i * block for i in range(size // block)],
            lambda off, buf: os.preadv(fd, [memoryview(buf)[:block]], off),
        )
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return nbytes / elapsed if nbytes else None


def _timed_write(folder: Path) -> float | None:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    fd_path = tempfile.mkstemp(prefix=".shardmerge-disk-rate-", dir=folder)
    os.close(fd_path[0])
    path = Path(fd_path[1])
    try:
        fd = _open_direct(path, os.O_WRONLY)
        try:
            nbytes, start = _in_threads(
                [i * BLOCK_BYTES for i in range(WRITE_BYTES // BLOCK_BYTES)],
                lambda off, buf: os.pwritev(fd, [buf], off),
            )
            os.fsync(fd)  # on the disk, not in the page cache (where O_DIRECT was refused)
            elapsed = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return nbytes / elapsed if nbytes else None
