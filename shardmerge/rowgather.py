"""Read a re-indexed (vocabulary-gathered) tensor chunk by chunk: runs of the model's own rows
are read straight into the chunk's buffer; other rows (another model's row, a mean, zero, the
padding mean) are made one row at a time. Memory: a row or two, and the padding mean's block."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardmerge.inventory import DTYPE_SIZES, TensorInfo
from shardmerge.vocab import GatheredTensor

# (model index, stored tensor, byte offset in it, destination, last read of these bytes)
ReadFn = Callable[[int, TensorInfo, int, memoryview, bool], None]

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# Rows per block when the padding mean reads the real rows (bounded, whatever the vocabulary).
_MEAN_BLOCK_NUMEL = 1 << 20


def read_gathered(
    info: GatheredTensor, byte_start: int, buf: memoryview, read: ReadFn, last: bool = True
) -> None:
    """Fill ``buf`` with the bytes of ``info`` (the re-indexed tensor) from ``byte_start``."""
    size = DTYPE_SIZES[info.dtype]
    row_bytes = info.row_numel * size
    if row_bytes == 0 or len(buf) == 0:
        return
    end = byte_start + len(buf)
    own = info.vocab.own[info.model]
    stored = info.sources[info.model]
    r = byte_start // row_bytes
    last_row = -(-end // row_bytes)
    while r < last_row:
        lo, hi = max(byte_start, r * row_bytes), min(end, (r + 1) * row_bytes)
        src = own[r]
        if src >= 0:
            # A run of consecutive own rows is one read.
            run = 1
            while r + run < last_row and own[r + run] == src + run:
                run += 1
            hi = min(end, (r + run) * row_bytes)
            dst = lo - byte_start
            read(
                info.model,
                stored,
                src * row_bytes + lo - r * row_bytes,
                buf[dst : hi - lo + dst],
                last,
            )
            r += run
            continue
        row = _made_row(info, r, read)
        dst = lo - byte_start
        buf[dst : dst + hi - lo] = row[lo - r * row_bytes : hi - r * row_bytes]
        r += 1


def _made_row(info: GatheredTensor, r: int, read: ReadFn) -> bytes:
    """The bytes of row ``r`` where the model has no row of its own."""
    dtype = _DTYPES[info.dtype]
    vocab = info.vocab
    if r >= vocab.real_rows:
        if "pad" not in info.cache:
            info.cache["pad"] = _real_rows_mean(info, read).to(dtype)
        return _as_bytes(info.cache["pad"])
    sources = vocab.fill.get(r, ())
    if not sources:
        return bytes(info.row_numel * DTYPE_SIZES[info.dtype])
    if len(sources) == 1:
        model, k = sources[0]
        return _as_bytes(_stored_row(info, model, k, read).to(dtype))
    # The mean of several models' rows, summed in float32 (mergekit adds in the stored dtype;
    # float32 is the exact sum of a few bf16 rows, so ours is within one rounding of theirs).
    total = torch.zeros(info.row_numel, dtype=torch.float32)
    for model, k in sources:
        total += _stored_row(info, model, k, read).to(torch.float32)
    return _as_bytes((total / len(sources)).to(dtype))


def _stored_row(info: GatheredTensor, model: int, k: int, read: ReadFn) -> torch.Tensor:
    stored = info.sources[model]
    size = DTYPE_SIZES[stored.dtype]
    raw = bytearray(info.row_numel * size)
    read(model, stored, k * info.row_numel * size, memoryview(raw), False)
    return torch.frombuffer(raw, dtype=_DTYPES[stored.dtype]).clone()


def _real_rows_mean(info: GatheredTensor, read: ReadFn) -> torch.Tensor:
    """The mean of the re-indexed tensor's real rows (read block by block, float64 sums)."""
    size = DTYPE_SIZES[info.dtype]
    row_bytes = info.row_numel * size
    block = max(1, _MEAN_BLOCK_NUMEL // max(1, info.row_numel))
    total = torch.zeros(info.row_numel, dtype=torch.float64)
    real = info.vocab.real_rows
    for start in range(0, real, block):
        count = min(block, real - start)
        raw = bytearray(count * row_bytes)
        read_gathered(info, start * row_bytes, memoryview(raw), read, last=False)
        rows = torch.frombuffer(raw, dtype=_DTYPES[info.dtype]).view(count, info.row_numel)
        total += rows.to(torch.float64).sum(dim=0)
    return total / max(1, real)


def _as_bytes(row: torch.Tensor) -> bytes:
    return row.contiguous().view(torch.uint8).numpy().tobytes()
