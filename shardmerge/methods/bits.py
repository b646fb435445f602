"""Masks of 16-bit floats as int16 bit patterns: the task-vector combine's cheap path.

On a CPU, torch's comparisons of bf16/f16 tensors, their bool results' sums and bool -> bf16
conversions each cost about 1 ns per element (one thread, 1 Mi-element chunks), five to twenty
times an int16 op on the same chunk (0.05-0.2 ns). The task-vector family makes a dozen of them
per chunk and model. This module computes the same masks from the floats' bit patterns
with int16 arithmetic instead: a mask is an int16 tensor, -1 (all bits set) where true and 0
where false, so masks combine with ``&``, ``|``, ``^`` and ``~``.

Every function gives exactly what the float comparison it replaces gives, for every bit
pattern: +-0, subnormals, +-inf and NaNs included (``tests/test_bits.py`` checks all 65536
patterns of both dtypes). They only apply to bf16 and f16, whose layouts share what matters
here: bit 15 is the sign, bits 0-14 the magnitude, and the magnitude orders like the integer.
"""

from __future__ import annotations

import threading

import torch

from shardmerge import heap

__all__ = [
    "INFINITY_BITS",
    "PackedMasks",
    "SIXTEEN_BIT",
    "count",
    "from_bool",
    "greater",
    "is_nonneg",
    "magnitudes",
    "nonzero",
    "nonzero_and_not_positive",
    "ones_where",
    "pack",
    "unpack",
    "where_zero_one",
]

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# Bit patterns of 1.0 and of +inf (a magnitude above it is a NaN).
_ONE = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}
_INF = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
INFINITY_BITS = _INF  # a magnitude key at or above it is an infinity or a NaN


def magnitudes(x: torch.Tensor) -> torch.Tensor:
    """int16 keys whose order is that of ``|x|`` (NaNs above +inf): the sign bit cleared."""
    return x.view(torch.int16).bitwise_and(0x7FFF)


def greater(keys: torch.Tensor, threshold: int) -> torch.Tensor:
    """Mask of ``keys > threshold`` for keys in [0, 0x7FFF] and a threshold in [-1, 0x7FFF]:
    ``threshold - key`` is negative exactly there, and an arithmetic shift spreads its sign."""
    if threshold < 0:
        return torch.full_like(keys, -1)
    if threshold >= 0x7FFF:
        return torch.zeros_like(keys)
    return torch.sub(threshold, keys).bitwise_right_shift_(15)


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """Mask of ``x != 0`` (NaNs are non-zero, -0 is zero)."""
    return magnitudes(x).neg_().bitwise_right_shift_(15)


def _nonzero_and_nan(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of ``x != 0`` and of NaNs, from one pass over the magnitudes: ``-key`` and
    ``inf - key`` are negative exactly where the key is above 0 and above inf's."""
    keys = magnitudes(x)
    nonzero = keys.neg().bitwise_right_shift_(15)
    nan = keys.neg_().add_(_INF[x.dtype]).bitwise_right_shift_(15)
    return nonzero, nan


def is_nonneg(x: torch.Tensor) -> torch.Tensor:
    """Mask of ``x >= 0``: not (sign set and non-zero), and not a NaN (so -0 counts)."""
    nonzero, nan = _nonzero_and_nan(x)
    negative = (x.view(torch.int16) >> 15).bitwise_and_(nonzero)
    return negative.bitwise_or_(nan).bitwise_not_()


def nonzero_and_not_positive(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of ``x != 0`` and of ``not (x > 0)`` where ``x != 0`` (sign set, or a NaN; either
    value where x is zero): for a mask ``p``, ``(x > 0) == p and x != 0`` is then
    ``second ^ p & first``, in three int16 ops."""
    nonzero, nan = _nonzero_and_nan(x)
    return nonzero, nan.bitwise_or_(x.view(torch.int16) >> 15)


def from_bool(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as an int16 one (converting bool to int16 is cheap; to bf16 it is not)."""
    return mask.to(torch.int16).neg_()


def ones_where(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1.0 where ``mask``, +0.0 elsewhere, in ``dtype``: ``mask.to(dtype)`` of the bool mask."""
    return mask.bitwise_and(_ONE[dtype]).view(dtype)


def where_zero_one(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every zero (+0 and -0) replaced by 1.0, in place:
    ``x.masked_fill_(x == 0, 1)``."""
    bits = x.view(torch.int16)
    keep = nonzero(x)
    one = keep.bitwise_not().bitwise_and_(_ONE[x.dtype])
    bits.bitwise_and_(keep).bitwise_or_(one)
    return x


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A mask in one bit per element (int16 words; :func:`unpack` restores it): element
    ``j * L + i`` of a mask padded to ``16 * L`` elements is bit ``j`` of word ``i``, so packing
    and unpacking are two whole-tensor ops each (about 0.1 ns per element here, against 1.4 ns
    for drawing a DARE mask again)."""
    n = mask.numel()
    if n % 16:
        mask = torch.cat([mask, mask.new_zeros(16 - n % 16)])
    weights = _bit_weights(mask.device).view(16, 1)
    # Each word gets distinct bits, so their int16 sum (wrapping at bit 15) is their OR.
    return (mask.view(16, -1) & weights).sum(dim=0, dtype=torch.int16)


def unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` elements of the mask that :func:`pack` packed into ``words``: each bit
    shifted up to the sign, then an arithmetic shift spreads it."""
    shifts = (15 - torch.arange(16, dtype=torch.int16, device=words.device)).view(16, 1)
    mask = (words.unsqueeze(0) << shifts).bitwise_right_shift_(15).view(-1)
    return mask[:n] if mask.numel() != n else mask


_weights: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    table = _weights.get(device)
    if table is None:
        ones = torch.ones(16, dtype=torch.int32, device=device)
        table = (ones << torch.arange(16, dtype=torch.int32, device=device)).to(torch.int16)
        _weights[device] = table
    return table


# Elements per int16 partial count (:func:`count`): a row of -1s sums to -16384, within int16.
COUNT_ROW = 1 << 14


def count(mask: torch.Tensor) -> torch.Tensor:
    """How many elements a mask holds (a 0-dim int64 tensor, on the mask's device): minus the
    sum of its -1s, as int16 sums of ``COUNT_ROW``-element rows (exact: at most 16384 in
    magnitude; torch vectorises them, a tenth of an int32 sum's time here), then their int64
    total."""
    flat = mask.reshape(-1)
    n = flat.numel()
    full = n - n % COUNT_ROW
    total = flat[full:].sum(dtype=torch.int64)
    if full:
        total += (
            flat[:full].view(-1, COUNT_ROW).sum(dim=1, dtype=torch.int16).sum(dtype=torch.int64)
        )
    return total.neg_()


class PackedMasks:
    """Int16 masks of a tensor's chunks kept from one pass to a later one, one bit per element
    (:func:`pack`): per key (a model), one store of words for the whole tensor, outside
    malloc's heap, made at its first chunk (word ``start // 16`` on is the chunk at
    ``start``); a chunk that starts elsewhere (row-aligned chunks of odd rows) is kept apart.
    Thread-safe; a key's store goes with its last chunk (one that comes later makes its mask
    again)."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self._stores: dict[int, torch.Tensor] = {}
        self._apart: dict[tuple[int, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def put(self, key: int, start: int, mask: torch.Tensor) -> None:
        words = pack(mask)
        if start % 16:
            with self._lock:
                self._apart[key, start] = words
            return
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                size = -(-self.numel // 16)
                store = self._stores[key] = heap.outside_heap(size, torch.int16, words.device)
        store[start // 16 : start // 16 + words.numel()].copy_(words)

    def take(self, key: int, start: int, count: int) -> torch.Tensor | None:
        """The mask kept for the ``count``-element chunk at ``start``, or None."""
        with self._lock:
            if start % 16:
                words = self._apart.pop((key, start), None)
            else:
                store = self._stores.get(key)
                if store is None:
                    return None
                words = store[start // 16 : start // 16 + -(-count // 16)]
                if start + count >= self.numel:  # the last chunk: the store goes with it
                    self._stores.pop(key, None)
        return None if words is None else unpack(words, count)
