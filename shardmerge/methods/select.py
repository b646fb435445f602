"""Exact top-k by magnitude over a whole tensor, in chunked passes and a few KiB of counters.

A non-negative IEEE float orders like its bit pattern read as an unsigned integer, so |x| is
ranked by ``key = bits(x) & ~sign``: 15 significant bits for bf16/f16, 31 for float32. A
16-bit tensor needs one pass: a histogram of its keys (32768 counters) gives the exact k-th
largest key. A float32 tensor needs two (radix selection): the top 15 bits first, then the low
16 bits of the elements in the one bucket that holds the k-th element.

Ties at the threshold key T: the elements equal to T that are kept are the first ones in flat
index order (the combine pass walks the chunks in order and carries a running count). So the
kept set is a pure function of the tensor: it never depends on chunk size, device, process
count or resume. (mergekit's unstable argsort keeps an arbitrary subset of the ties.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from shardmerge import heap
from shardmerge.methods import bits

__all__ = [
    "NAN_KEY",
    "KeySpace",
    "RankSelector",
    "Threshold",
    "key_space",
    "magnitude_keys",
    "row_ranks",
]


@dataclass(frozen=True)
class KeySpace:
    """How a dtype's magnitudes are ranked: key bits and the digits of the radix passes."""

    bits: int  # 15 or 31
    digit_shifts: tuple[int, ...]  # per pass, from the most significant digit


def key_space(dtype: torch.dtype) -> KeySpace:
    if dtype in (torch.bfloat16, torch.float16):
        return KeySpace(15, (0,))
    if dtype == torch.float32:
        return KeySpace(31, (16, 0))
    raise ValueError(f"magnitude selection supports 16- and 32-bit floats, not {dtype}")


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the order of ``|x|`` (x: bf16, f16 or f32)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.view(torch.int16).to(torch.int32).bitwise_and_(0x7FFF)
    if x.dtype == torch.float32:
        return x.view(torch.int32).bitwise_and(0x7FFFFFFF)
    raise ValueError(f"magnitude selection supports 16- and 32-bit floats, not {x.dtype}")


@dataclass(frozen=True)
class Threshold:
    """Keep ``key > key_t``, plus the first ``at_key`` elements (in flat order) equal to it.
    ``key_t = -1`` with ``at_key = 0`` keeps everything; ``key_t = 2**31 - 1`` with ``at_key =
    0`` nothing (no key exceeds it, and an element of that key is never kept)."""

    key_t: int
    at_key: int


_NONE = Threshold(0x7FFFFFFF, 0)
_ALL = Threshold(-1, 0)


def _count_of(store: torch.Tensor | None, at: int, n: int, digit: int) -> int:
    """The counter of ``digit`` among a chunk's kept non-zero counters: ``n`` digits
    (ascending) at ``store[at:]``, then their ``n`` counts."""
    if store is None or n == 0:
        return 0
    digits = store[at : at + n]
    i = int(torch.searchsorted(digits, digit))
    return int(store[at + n + i]) if i < n and int(digits[i]) == digit else 0


class RankSelector:
    """The thresholds that keep exactly the top ``m`` keys, for each ``m`` in ``counts``.

    Call :meth:`add` with every chunk's keys in each pass (any chunking, any order within a
    pass), :meth:`end_pass` after each; after ``space.digit_shifts`` passes, :attr:`thresholds`
    holds one :class:`Threshold` per count. Then :meth:`mask` per chunk, in flat order; or, when
    :attr:`any_order` (the chunks' counts of the last pass were kept, see ``count_budget``), in
    any order, naming each chunk by its start.
    """

    def __init__(
        self, numel: int, counts: tuple[int, ...], space: KeySpace, count_budget: int = 0
    ) -> None:
        self.space = space
        self.numel = numel
        self.counts = counts
        # Per count: the key prefix found so far (its digits), and how many of the elements
        # with that prefix are still to keep.
        self._prefix = [0] * len(counts)
        self._need = list(counts)
        self._pass = 0
        self._hist: dict[int, torch.Tensor] = {}  # prefix -> counters of the next digit
        self.thresholds: list[Threshold] = []
        self._seen_at_key = [0] * len(counts)
        self._lock = threading.Lock()
        # The last pass's counts per (prefix, chunk start), kept while they take at most
        # ``count_budget`` bytes: after it, where the tied elements at each threshold lie (per
        # count: chunk start -> ties in the chunks before it, and in it). Only a chunk's
        # non-zero counters are kept, with their digits (8 bytes each: a 1 Mi-element chunk of
        # bf16 deltas fills ~2 Ki of the 64 Ki counters, 16 KiB against 256 KiB for them all).
        self._budget = count_budget
        # They go one after another into one int32 store outside malloc's heap
        # (heap.outside_heap: pages count once written); per (prefix, start): offset, length.
        self._chunk_counts: dict[tuple[int, int], tuple[int, int]] | None = (
            {} if count_budget else None
        )
        self._store: torch.Tensor | None = None
        self._used = 0
        self._ties: list[dict[int, tuple[int, int]] | None] = [None] * len(counts)

    @property
    def passes(self) -> int:
        return len(self.space.digit_shifts) if self._active() else 0

    def _active(self) -> bool:
        return any(0 < m < self.numel for m in self.counts)

    def _digit_width(self, p: int) -> int:
        shifts = self.space.digit_shifts
        top = self.space.bits if p == 0 else shifts[p - 1]
        return top - shifts[p]

    def add(self, keys: torch.Tensor, start: int | None = None) -> None:
        """Count one chunk's keys (int32, from :func:`magnitude_keys`) for the current pass;
        ``start``, the chunk's first element, lets masks be made in any order later."""
        p = self._pass
        last = p == len(self.space.digit_shifts) - 1
        shift = self.space.digit_shifts[p]
        bins = 1 << self._digit_width(p)
        prefixes = {self._prefix[i] for i, m in enumerate(self.counts) if 0 < m < self.numel}
        for prefix in prefixes:
            if p == 0:
                digits = keys >> shift if shift else keys
            else:
                upper = self.space.digit_shifts[p - 1]
                digits = keys[(keys >> upper) == prefix]
                digits = digits.bitwise_and_((1 << upper) - 1) >> shift
            # int16/int32 keys straight into bincount: converting them to int64 first cost
            # three times the count itself.
            counts = torch.bincount(digits, minlength=bins).cpu()
            with self._lock:  # the engine may count two chunks at once
                if prefix in self._hist:
                    self._hist[prefix] += counts
                else:
                    self._hist[prefix] = counts
                if last and self._chunk_counts is not None:
                    self._keep_chunk_counts(prefix, start, counts)

    def _keep_chunk_counts(self, prefix: int, start: int | None, counts: torch.Tensor) -> None:
        """Keeps a chunk's non-zero counters of the last pass (under the lock), or gives up
        keeping any once they pass the budget (masks then go in flat order)."""
        assert self._chunk_counts is not None
        digits = counts.nonzero().view(-1)
        n = digits.numel()
        if start is None or 4 * (self._used + 2 * n) > self._budget:
            self._chunk_counts = None  # no room (or no start): masks in flat order
            self._store = None
            return
        if self._store is None:
            # Every non-zero counter holds at least one of the tensor's elements.
            size = min(self._budget // 4, 2 * self.numel)
            self._store = heap.outside_heap(size, torch.int32, torch.device("cpu"))
        at = self._used
        self._store[at : at + n] = digits
        self._store[at + n : at + 2 * n] = counts[digits]
        self._used += 2 * n
        self._chunk_counts[prefix, start] = (at, n)

    def end_pass(self) -> None:
        p = self._pass
        width = self._digit_width(p)
        bins = 1 << width
        last = p == len(self.space.digit_shifts) - 1
        for i, m in enumerate(self.counts):
            if not 0 < m < self.numel:
                continue
            hist = self._hist.get(self._prefix[i], torch.zeros(bins, dtype=torch.int64))
            # Walk the digits from the top: the digit holding the need-th largest element.
            from_top = hist.flip(0).cumsum(0)
            idx = int(torch.searchsorted(from_top, self._need[i]))
            digit = bins - 1 - idx
            above = int(from_top[idx]) - int(hist[digit])
            self._need[i] -= above
            if last and self._chunk_counts is not None:
                self._ties[i] = self._chunk_ties(self._prefix[i], digit)
            self._prefix[i] = (self._prefix[i] << width) | digit
        self._hist = {}
        self._pass += 1
        if self._pass == len(self.space.digit_shifts):
            self.thresholds = [self._threshold(i) for i in range(len(self.counts))]
            self._chunk_counts = None
            self._store = None

    def _chunk_ties(self, prefix: int, digit: int) -> dict[int, tuple[int, int]]:
        """Per chunk start: the elements of the threshold's key (``prefix`` then ``digit``) in
        the chunks before it, in flat order, and in it."""
        assert self._chunk_counts is not None
        assert self._store is not None or not self._chunk_counts
        here = sorted(
            (start, _count_of(self._store, at, n, digit))
            for (p, start), (at, n) in self._chunk_counts.items()
            if p == prefix
        )
        ties, seen = {}, 0
        for start, count in here:
            ties[start] = (seen, count)
            seen += count
        return ties

    @property
    def any_order(self) -> bool:
        """Whether masks may be made for chunks in any order (by their start)."""
        return all(
            th.at_key == 0 or ties is not None
            for th, ties in zip(self.thresholds, self._ties, strict=True)
        )

    def _threshold(self, i: int) -> Threshold:
        m = self.counts[i]
        if m <= 0:
            return _NONE
        if m >= self.numel:
            return _ALL
        return Threshold(self._prefix[i], self._need[i])

    def finish_without_passes(self) -> None:
        """For selections that need no pass (every count is 0 or the whole tensor)."""
        self.thresholds = [self._threshold(i) for i in range(len(self.counts))]

    def set_counts(self, counts: tuple[int, ...]) -> None:
        """Replace the counts before the first pass ends (a selection whose k comes from the
        same pass, as SCE's from the count of non-zero variances). The first pass's counters
        are the same for any counts that make a selection at all: the selector must have been
        made with one (0 < m < numel), and the new counts must make one too."""
        if self._pass or not self._active():
            raise AssertionError("counts change only before the first pass ends, once active")
        self.counts = counts
        self._need = list(counts)
        self._prefix = [0] * len(counts)
        self._seen_at_key = [0] * len(counts)
        self._ties = [None] * len(counts)
        if not self._active():
            raise AssertionError(f"counts {counts} of {self.numel} elements select nothing")

    def restart(self) -> None:
        """Rewind the running tie counts, before a new walk over the chunks in flat order."""
        self._seen_at_key = [0] * len(self.counts)

    def mask(self, keys: torch.Tensor, i: int, start: int | None = None) -> torch.Tensor:
        """The keep mask (bool) of count ``i`` for the next chunk in flat order, or for the
        chunk at ``start`` (any order) when :attr:`any_order`."""
        threshold, left = self._chunk_rule(keys, i, start)
        if left == 0:
            return keys > threshold
        return _boundary_mask(keys, threshold, left)

    def mask_bits(self, keys: torch.Tensor, i: int, start: int | None = None) -> torch.Tensor:
        """:meth:`mask` as an int16 mask (:mod:`shardmerge.methods.bits`), for the int16 keys
        of a 16-bit tensor (:func:`shardmerge.methods.bits.magnitudes`)."""
        threshold, left = self._chunk_rule(keys, i, start)
        if left == 0:
            return bits.greater(keys, threshold)
        return bits.from_bool(_boundary_mask(keys, threshold, left))

    def _chunk_rule(self, keys: torch.Tensor, i: int, start: int | None) -> tuple[int, int]:
        """For count ``i`` and the next chunk (or the chunk at ``start``, whose ties are known):
        ``(t, 0)``, keep ``key > t``; or, in the chunk where the kept ties at the threshold run
        out, ``(key_t, left)``: keep ``key > key_t`` and the first ``left`` elements equal to it.
        Advances the running tie count of a walk in flat order."""
        th = self.thresholds[i]
        ties = self._ties[i]
        if th.at_key and ties is not None:
            if start not in ties:
                raise AssertionError(f"no chunk at {start} was counted: chunks must not change")
            seen, here = ties[start]
            left = th.at_key - seen
            if left <= 0:
                return th.key_t, 0
            return (th.key_t - 1, 0) if here <= left else (th.key_t, left)
        left = th.at_key - self._seen_at_key[i]
        if th.at_key == 0 or left <= 0:
            return th.key_t, 0
        # The threshold is a real key here, so it fits the keys' dtype.
        here = keys.numel() - int(torch.count_nonzero(keys ^ th.key_t))
        self._seen_at_key[i] += here
        if here <= left:  # every tie in this chunk is kept
            return th.key_t - 1, 0
        return th.key_t, left


def _boundary_mask(keys: torch.Tensor, key_t: int, left: int) -> torch.Tensor:
    """Keep ``key > key_t`` and the first ``left`` keys equal to it, in flat order (bool)."""
    at = keys == key_t
    return (keys > key_t).logical_or_(at.logical_and_(at.cumsum(0) <= left))


# Magnitude keys above +inf are NaNs: they all rank as one value above +inf, as a float sort
# ranks NaNs (then by index, like every tie).
NAN_KEY = {torch.bfloat16: 0x7F81, torch.float16: 0x7C01, torch.float32: 0x7F800001}


def row_ranks(x: torch.Tensor, row: int) -> torch.Tensor:
    """Per ``row``-element row of flat ``x``, each element's rank by ``|x|`` from 0, ties by
    index: what a stable argsort of ``|x|`` gives (tested on every bf16/f16 pattern), about
    1.5-2x faster. The magnitude's bit pattern and the index make one integer key per element,
    all distinct, so a plain sort of integers does it."""
    rows = x.view(-1, row)
    index = torch.arange(row, device=x.device)
    if x.dtype in (torch.bfloat16, torch.float16):
        keys = rows.view(torch.int16).to(torch.int32).bitwise_and_(0x7FFF)
        keys.clamp_(max=NAN_KEY[x.dtype]).bitwise_left_shift_(16)
        keys.bitwise_or_(index.to(torch.int32))
    elif x.dtype == torch.float32:
        keys = rows.view(torch.int32).to(torch.int64).bitwise_and_(0x7FFFFFFF)
        keys.clamp_(max=NAN_KEY[x.dtype]).bitwise_left_shift_(32).bitwise_or_(index)
    else:
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        return torch.empty_like(order).scatter_(1, order, index.expand_as(order))
    order = torch.sort(keys, dim=1).indices
    return torch.empty_like(order).scatter_(1, order, index.expand_as(order))
