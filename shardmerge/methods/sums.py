"""Float64 sums over a whole tensor that do not depend on how it was cut into chunks.

A reduction pass sums each *block* (a row for row-aligned methods, else ``L1_BLOCK`` elements;
a chunk always holds whole blocks) in float64, then adds the block sums one after another in
flat order (a sequential scan, ``cumsum`` on the CPU, continued from chunk to chunk). Both steps
see the same numbers in the same order whatever the chunk size, so the totals are the same for
any chunking, device split or resume point, in a few bytes of state. Per-row statistics
(``keep_blocks``) keep each block's sums instead: a few float64 per row.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from shardmerge.methods import bits

__all__ = [
    "F32_BLOCK",
    "PIECE_NUMEL",
    "BlockSums",
    "block_gram",
    "block_sums",
    "pieces",
    "row_sums_f32",
    "sum_rounded",
]

# Elements per piece a reduction converts to float64 at a time: its temporaries stay in the CPU's
# cache instead of being fresh multi-MiB allocations per chunk (measured: a 1 Mi-element chunk's
# float64 copies cost ~12 ns per element in page faults and memory traffic, pieces ~2). 256 Ki
# rather than 64 Ki: the same cost alone (model_stock's statistics pass 2.76 against 2.75-2.85
# ns/el, 1 Mi: 6.4-6.8), and a quarter of the torch calls, each of which hands the GIL over
# between the two compute threads, the reader and the writer: a medium model_stock merge took
# 6.22-6.44 s against 7.03-7.30 s (three alternating pairs, the same bytes).
PIECE_NUMEL = 1 << 18


# Elements per float32 partial sum (:func:`row_sums_f32`): under torch's parallel grain (32 Ki
# elements), so each partial is summed serially by one kernel whatever surrounds it.
F32_BLOCK = 1 << 14


def pieces(n: int, unit: int, size: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` spans of about ``size`` (default :data:`PIECE_NUMEL`) elements covering
    ``n``, each a whole number of ``unit``-element blocks (at least one)."""
    step = max(1, (PIECE_NUMEL if size is None else size) // unit) * unit
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def row_sums_f32(x: torch.Tensor, row: int) -> torch.Tensor:
    """Each ``row``-element row's sum of flat ``x`` (whole rows), as float64: float32 sums of
    blocks of at most :data:`F32_BLOCK` elements (each row cut the same way, whatever the rows
    around it), added in float64.

    For 16-bit inputs whose terms are exact in float32 (squares of bf16/fp16 values, products
    rounded to them), each float32 block sum is within a few float32 roundings of the float64
    one (relative ~1e-7, far below a bf16 step) at a fraction of the cost of float64 copies."""
    rows = x.view(-1, row)
    if row <= F32_BLOCK:
        return rows.sum(1, dtype=torch.float32).to(torch.float64)
    full = row - row % F32_BLOCK
    blocks = rows[:, :full].reshape(rows.shape[0], -1, F32_BLOCK).sum(2, dtype=torch.float32)
    parts = [blocks]
    if full < row:
        parts.append(rows[:, full:].sum(1, dtype=torch.float32, keepdim=True))
    return torch.cat(parts, 1).to(torch.float64).sum(1)


class BlockSums:
    """Per-block float64 sums of ``width`` quantities, totalled in flat order.

    Chunks may arrive in any order, from several threads, when each names its first block
    (``add(sums, first)``): one that comes early waits in a small stash until the blocks before
    it are in, so the fold, and so every total, is the flat-order one whatever the arrival
    order (with two compute threads, about one chunk's block sums wait at a time)."""

    def __init__(self, width: int, keep_blocks: bool = False) -> None:
        self.width = width
        self.keep_blocks = keep_blocks
        self._running = torch.zeros(width, dtype=torch.float64)
        self._parts: list[torch.Tensor] = []
        self._next = 0  # the first block not yet folded
        self._early: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def add(self, sums: torch.Tensor, first: int | None = None) -> None:
        """One chunk's block sums, ``(blocks, width)`` float64, in flat order; ``first``: the
        index of its first block (None: it comes right after the previous one)."""
        sums = sums.reshape(-1, self.width).to("cpu", torch.float64)
        with self._lock:
            if first is None:
                first = self._next
            if first != self._next:
                if first < self._next or first in self._early:
                    raise AssertionError(f"block sums from block {first} added twice")
                self._early[first] = sums
                return
            self._fold(sums)
            while self._next in self._early:
                self._fold(self._early.pop(self._next))

    def _fold(self, sums: torch.Tensor) -> None:
        if self.keep_blocks:
            self._parts.append(sums)
        # The CPU's cumsum is a sequential scan: the left fold over every block in flat order.
        self._running = torch.cat([self._running.unsqueeze(0), sums]).cumsum(0)[-1]
        self._next += sums.shape[0]

    def per_block(self) -> torch.Tensor:
        """Every block's sums, ``(blocks, width)``, in flat order (``keep_blocks`` only)."""
        assert self.keep_blocks
        if self._early:
            raise AssertionError(f"block sums missing before block {min(self._early)}")
        if not self._parts:
            return torch.zeros(0, self.width, dtype=torch.float64)
        return torch.cat(self._parts)

    def totals(self) -> list[float]:
        """Each quantity's sum over every block."""
        if self._early:
            raise AssertionError(f"block sums missing before block {min(self._early)}")
        return [float(x) for x in self._running.tolist()]


def block_gram(vectors: list[torch.Tensor], block: int) -> torch.Tensor:
    """Each block's Gram matrix of ``vectors`` (flat, same length), float64: ``(blocks, K*K)``."""
    n = vectors[0].numel()
    if n > PIECE_NUMEL:
        parts = [block_gram([v[s:e] for v in vectors], block) for s, e in pieces(n, block)]
        return torch.cat(parts)
    x = torch.stack([v.to(torch.float64) for v in vectors])
    k, n = x.shape
    full = n - n % block
    parts = []
    if full:
        b = x[:, :full].view(k, -1, block).transpose(0, 1)  # (blocks, K, block)
        parts.append(torch.bmm(b, b.transpose(1, 2)).reshape(-1, k * k))
    if n > full:
        tail = x[:, full:]
        parts.append((tail @ tail.T).reshape(1, k * k))
    return torch.cat(parts) if parts else torch.zeros(0, k * k, dtype=torch.float64)


def sum_rounded(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum(parts) accumulated in float32 (float64 for float64) in order, rounded to ``dtype``
    once: torch's sum(dim=0) of the stacked parts, for 16-bit dtypes."""
    if dtype in bits.SIXTEEN_BIT and len(parts) <= 2 and all(p.dtype == dtype for p in parts):
        # torch's own 16-bit add is a float32 sum rounded once: the same bytes for two parts
        # (tests/test_methods.py checks every bit pattern), without three conversions.
        return parts[0] + parts[1] if len(parts) == 2 else parts[0].clone()
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = parts[0].to(acc_dtype, copy=True)
    for part in parts[1:]:
        acc.add_(part)
    return acc.to(dtype)


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """float64 sums of ``x`` over consecutive ``block``-element blocks (the last may be short).
    A cache-sized piece of whole blocks at a time (sums.pieces): torch converts a 16-bit
    tensor to float64 before summing it, and a chunk-sized float64 copy cost twice as much."""
    n = x.numel()
    full = n - n % block
    sums = [x[s:e].view(-1, block).sum(dim=1, dtype=torch.float64) for s, e in pieces(full, block)]
    if n > full:
        sums.append(x[full:].sum(dtype=torch.float64).reshape(1))
    return torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64, device=x.device)
