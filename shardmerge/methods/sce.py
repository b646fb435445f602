"""``sce``: SCE (FuseChat, arXiv 2408.07990): select, calculate, erase; mergekit 0.1.5's arithmetic.

For base ``b`` and models ``x_i`` with task vectors ``d_i = x_i - b`` (in the merge dtype):

* **select** (``select_topk`` below 1): every ``d_i`` keeps only the elements whose variance
  across the models (``var_i d_i``, population variance, rounded to the merge dtype) is among
  the ``k = int(nonzero * select_topk)`` largest, ``nonzero`` being the elements of non-zero
  variance; equal variances at the threshold keep the first in flat order (mergekit's ``topk``:
  arbitrary ones). ``select_topk`` 1 keeps everything, 0 nothing;
* **calculate**: per model ``w_i = mean(d_i^2) / sum_j mean(d_j^2)`` over the whole (selected)
  tensor, or ``1/K`` each when that sum is below 1e-6;
* **erase**: model ``i`` takes part in an element where its ``d_i`` is non-zero and has the sign
  of ``sum_j d_j`` (zero counting as positive): TIES's election on the unweighted vectors.

The result is ``b + sum_i w_i d_i [taking part] / max(sum_i w_i [taking part], 1e-6)``, every
op in the merge dtype in mergekit's order.

Passes over the tensor: with a selection, the count of non-zero variances, then the radix
pass over the variances' keys (:mod:`shardmerge.methods.select`; two for float32 merges); then
each model's sum of squares (float64 sums of fixed blocks, folded in flat order:
:class:`~shardmerge.methods.sums.BlockSums`, so the weights do not depend on the chunking);
then the combine. The variances are computed again in each pass that needs them rather than
kept (two bytes per element of state otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch

    from shardmerge.methods.select import RankSelector

# Variance keys kept from the first pass for the squares pass: tensors of up to this many
# elements (64 MiB of int16 keys); a larger one computes its variances again.
KEY_CACHE_NUMEL = 1 << 25
# Masks kept from the squares pass for the combine: tensors of up to this many elements (64 MiB
# of bits); a larger one makes its masks again.
MASK_CACHE_NUMEL = 1 << 29
# Elements per piece of the variance's float64 recurrence (its temporaries stay in the cache).
VARIANCE_PIECE = 1 << 14
# mergekit: a weight sum below this gives every model 1/K; a divisor below it is raised to it.
WEIGHT_SUM_MIN = 1e-6
DIVISOR_MIN = 1e-6


class SCEMerge:
    def __init__(self, job: TensorJob) -> None:
        import torch

        from shardmerge.methods import bits
        from shardmerge.methods.select import key_space
        from shardmerge.methods.sums import BlockSums
        from shardmerge.methods.task_vectors import ElectionCounts

        self.job = job
        self.dtype = job.dtype
        self.count = len(job.model_params)
        self.topk = float(job.shared["select_topk"])
        self.bits = job.dtype in bits.SIXTEEN_BIT
        # "all": no selection (mergekit skips the mask); "none": every element masked out;
        # "select": the top-k variances, k known after the counting pass.
        self.mode = "all" if self.topk >= 1 else "none" if self.topk <= 0 else "select"
        self.selector: RankSelector | None = None
        self._nonzero = 0
        self._kept: torch.Tensor | None = None
        self._election = ElectionCounts()
        self._lock = threading.Lock()
        selecting = self.mode == "select" and job.numel > 0
        self.select_passes = len(key_space(job.dtype).digit_shifts) if selecting else 0
        if selecting:
            from shardmerge.methods.select import RankSelector
            from shardmerge.methods.task_vectors import TIE_COUNT_BYTES

            # k = int(nonzero * select_topk) is known once the first pass has counted the
            # non-zero variances; that pass's histogram does not depend on k (set_counts).
            self.selector = RankSelector(job.numel, (1,), key_space(job.dtype), TIE_COUNT_BYTES)
        # Passes: the selection's (the first also counts), then the squares.
        self.squares_pass = self.select_passes
        self.passes = self.squares_pass + 1 if job.numel else 0
        # The squares pass's masks, one bit each, for the combine (16-bit merges).
        self._masks = bits.PackedMasks(job.numel) if self.bits else None
        # The first pass's variance keys for the squares pass (16-bit merges, 2 bytes an
        # element, tensors up to KEY_CACHE_NUMEL elements): the variances are not made again.
        self._cache_keys = selecting and self.bits and job.numel <= KEY_CACHE_NUMEL
        self._key_store: torch.Tensor | None = None
        self.sums = BlockSums(self.count)
        self.weights = torch.full((self.count,), 1.0 / self.count, dtype=self.dtype)

    # ------------------------------------------------------------------ passes

    def in_any_order(self, pass_index: int) -> bool:
        """Counts, radix histograms and block sums add up in any order; masks with ties at the
        threshold go in flat order unless the selection kept where each chunk's ties lie."""
        if self.selector is None or pass_index <= self.select_passes:
            return True
        return self.selector.any_order

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        import torch

        from shardmerge import heap

        deltas = _deltas(inputs)
        if pass_index < self.squares_pass:
            keys = self._keys(_variance(deltas))
            if pass_index == 0:  # key 0 is +-0: the variances mergekit counts as zero
                here = int(torch.count_nonzero(keys))
                with self._lock:
                    self._nonzero += here
                    if self._cache_keys and self._key_store is None:
                        self._key_store = heap.outside_heap(
                            self.job.numel, torch.int16, keys.device
                        )
                if self._key_store is not None:
                    self._key_store[start : start + keys.numel()] = keys
            if self.selector is not None and self.selector.passes:
                self.selector.add(keys, start)
            return
        from shardmerge.methods.sums import block_sums
        from shardmerge.methods.task_vectors import L1_BLOCK

        selected = self._selected(deltas, start, combine=False)
        columns = [block_sums(tv.square(), L1_BLOCK) for tv in selected]
        self.sums.add(torch.stack(columns, dim=1), start // L1_BLOCK)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0 and self.squares_pass:
            self._set_k()
        if pass_index < self.squares_pass:
            if self.selector is not None:
                if self.selector.passes:
                    self.selector.end_pass()
                else:
                    self.selector.finish_without_passes()
        else:
            self._calculate_weights()
            if self.selector is not None:
                self.selector.restart()  # the combine walks the masks again
            del self.sums

    def _set_k(self) -> None:
        import torch

        # mergekit: int(count_nonzero(var) * select_topk), a float32 product in torch.
        k = int(torch.tensor(self._nonzero, dtype=torch.int64) * self.topk)
        if k == 0:
            self.mode = "none"
            self.selector = None
        elif k >= self.job.numel:  # a float32 product can round up to every element
            self.mode = "all"
            self.selector = None
        elif self.selector is not None:
            self.selector.set_counts((k,))

    def _calculate_weights(self) -> None:
        import torch

        self._key_store = None  # the masks are made: the keys are no longer needed

        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        # mergekit: mean(d_i^2) of the merge dtype, a float32 sum (float64: float64) divided
        # by the element count, rounded to the merge dtype; here that sum is the exact one.
        totals = torch.tensor(self.sums.totals(), dtype=torch.float64).to(acc)
        weights = (totals / self.job.numel).to(self.dtype)
        weight_sum = torch.sum(weights).item()
        if abs(weight_sum) < WEIGHT_SUM_MIN:
            self.weights = torch.ones_like(weights) / weights.shape[0]
        else:
            self.weights = weights / weight_sum

    # ------------------------------------------------------------------ combine

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        import torch

        from shardmerge.methods import bits
        from shardmerge.methods.sums import sum_rounded

        base = inputs[0]
        dtype = base.dtype
        tvs = self._selected(_deltas(inputs), start, combine=True)
        weights = [w.to(base.device) for w in self.weights.unbind()]
        summed = sum_rounded(tvs, dtype)
        if self.bits:
            positive = bits.is_nonneg(summed)
            signs = [bits.nonzero_and_not_positive(tv) for tv in tvs]
            agreeing = [other.bitwise_xor_(positive).bitwise_and_(nz) for nz, other in signs]
            self._election.add([nz for nz, _ in signs], agreeing, bits.count)
            # w * mask: w where the model takes part, +0 elsewhere (the weights are >= 0).
            erased = [
                a.bitwise_and(w.view(torch.int16)).view(dtype)
                for a, w in zip(agreeing, weights, strict=True)
            ]
        else:
            positive_bool = summed >= 0
            nonzero = [tv != 0 for tv in tvs]
            agree_bool = [
                (tv > 0).eq_(positive_bool).logical_and_(nz)
                for tv, nz in zip(tvs, nonzero, strict=True)
            ]
            self._election.add(nonzero, agree_bool, torch.sum)
            erased = [w * a.to(dtype) for a, w in zip(agree_bool, weights, strict=True)]
        merged = sum_rounded([tv * e for tv, e in zip(tvs, erased, strict=True)], dtype)
        divisor = sum_rounded(erased, dtype).clamp(min=DIVISOR_MIN)
        return base + merged / divisor

    # ------------------------------------------------------------------ helpers

    def _stored_keys(self, start: int, count: int) -> torch.Tensor | None:
        """The first pass's keys of the chunk, where they were kept (16-bit merges)."""
        store = self._key_store
        return None if store is None else store[start : start + count]

    def _keys(self, variance: torch.Tensor) -> torch.Tensor:
        """Magnitude keys of the variances, every NaN one key above +inf (ties by index)."""
        from shardmerge.methods import bits
        from shardmerge.methods.select import NAN_KEY, magnitude_keys

        keys = bits.magnitudes(variance) if self.bits else magnitude_keys(variance)
        return keys.clamp_(max=NAN_KEY[self.dtype])

    def _selected(
        self, deltas: list[torch.Tensor], start: int, combine: bool
    ) -> list[torch.Tensor]:
        """The task vectors times the selection mask (mergekit multiplies: a dropped element is
        a zero of its sign, an infinity a NaN); unchanged without a selection. The squares
        pass keeps its masks for the ``combine``, which counts the kept elements."""
        import torch

        from shardmerge.methods import bits

        if self.mode == "all":
            return deltas
        if self.mode == "none" or self.selector is None:
            mask = torch.zeros_like(deltas[0])
            kept = torch.zeros((), dtype=torch.int64)
        elif self._masks is not None:
            n = deltas[0].numel()
            keep = self._masks.take(0, start, n) if combine else None
            if keep is None:
                keys = self._stored_keys(start, n)
                if keys is None:
                    keys = self._keys(_variance(deltas))
                keep = self.selector.mask_bits(keys, 0, start)
                if not combine and self.job.numel <= MASK_CACHE_NUMEL:
                    self._masks.put(0, start, keep)
            mask, kept = bits.ones_where(keep, self.dtype), bits.count(keep)
        else:
            keep_bool = self.selector.mask(self._keys(_variance(deltas)), 0, start)
            mask, kept = keep_bool.to(self.dtype), keep_bool.sum()
        if combine:
            with self._lock:
                self._kept = kept if self._kept is None else self._kept + kept
        return [d * mask for d in deltas]

    def statistics(self) -> dict[str, object]:
        """The weights SCE calculated, the elements its selection kept (the same for every
        model; None: no selection) and its sign election's counts (:mod:`shardmerge.mergestats`)."""
        kept: int | None = None
        if self.mode != "all":
            kept = 0 if self._kept is None else int(self._kept.item())
        return {
            "weights": [float(w) for w in self.weights.tolist()],
            "kept": [kept] * self.count,
            **self._election.record(),
        }


def _deltas(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    base = inputs[0]
    return [x - base for x in inputs[1:]]


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's ``torch.var(stacked, dim=0, unbiased=False)`` per element, in the merge dtype,
    bit for bit: the CPU kernel's Welford recurrence in float64 over the models (mean += d /
    k, m2 += d * (x - mean)), m2 / K rounded to float32 and then to the merge dtype. torch's
    own kernel takes ~110 ns per element here (a scalar loop per output element); this, in
    cache-sized pieces, ~9 for two models. NaN payloads may differ from torch's; the keys
    treat every NaN alike."""
    import torch

    from shardmerge.methods.sums import pieces

    count = len(deltas)
    out = torch.empty_like(deltas[0])
    wide = out.dtype == torch.float64
    for s, e in pieces(out.numel(), 1, VARIANCE_PIECE):
        mean = torch.zeros(e - s, dtype=torch.float64, device=out.device)
        m2 = torch.zeros_like(mean)
        for k, d in enumerate(deltas, start=1):
            x = d[s:e].to(torch.float64)
            delta = x - mean
            mean.add_(delta / k)
            m2.add_(delta.mul_(x.sub_(mean)))
        m2.div_(count)
        out[s:e] = m2 if wide else m2.to(torch.float32)
    return out


METHOD = MethodSpec(
    name="sce",
    base="required",
    params=(
        Param("select_topk", per_model=False, default=1.0, low=0.0, high=1.0),
        # Accepted for compatibility: it makes mergekit's masks int8; the result is the same.
        Param("int8_mask", per_model=False, default=False, kind="bool"),
    ),
    start=SCEMerge,
    summary="SCE: top-variance elements, weights from the task vectors' squares, sign election",
)
