"""The task-vector family (task arithmetic, TIES, DARE, breadcrumbs), streamed.

For base ``b`` and models ``x_i``: task vectors ``d_i = x_i - b``; each is sparsified (kept
where a mask says, optionally rescaled so its L1 norm is unchanged), weighted, optionally
filtered by sign election, summed, optionally normalised, times ``lambda``, plus ``b``.
The per-chunk arithmetic is mergekit 0.1.5's op for op, in the merge dtype (bf16 for
``dtype: bfloat16``), so results agree with it bit for bit wherever the masks agree:

* sign election (TIES): the elected sign is that of the sum of weighted deltas (zero counts
  as positive); a model takes part where its weighted delta has that sign (so pruned zeros
  drop out); ``normalize`` divides by the sum of the weights taking part (0 -> 1);
* without it, ``normalize`` divides by the sum of the weights (|sum| < 1e-8 -> 1);
* ``rescale`` multiplies a masked delta by ``L1(d) / L1(masked d)``, both rounded to the
  working dtype, unless either is below 1e-7 (mergekit's eps).

What needs the whole tensor comes from reduction passes: magnitude thresholds (one or two
radix passes, :mod:`shardmerge.methods.select`) and the two L1 norms (one pass, after the
thresholds). The L1 norms are float64 sums of fixed 1024-element blocks added up exactly
(``math.fsum``), so they do not depend on the chunking either.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from shardmerge import heap
from shardmerge.methods import bits, rng
from shardmerge.methods.family import Family
from shardmerge.methods.select import RankSelector, key_space, magnitude_keys, row_ranks
from shardmerge.methods.spec import TensorJob
from shardmerge.methods.sums import block_sums, pieces, sum_rounded

__all__ = ["L1_BLOCK", "ElectionCounts", "TaskVectorMerge"]

# Elements per L1 block; the engine's chunks are whole blocks, so a block never straddles two.
L1_BLOCK = 1024
# Masks drawn in the L1 pass are kept for the combine, one bit per element (bits.pack), when
# the tensor's masks take at most this many bytes: drawing a DARE mask costs 1.4 ns per element,
# unpacking a kept one 0.1 ns (and a DELLA mask, with its per-row sort, far more). A larger
# tensor (a 1 GB embedding of four models: 250 MB) draws them again, in bounded memory.
MASK_CACHE_BYTES = 64 << 20
# Per model and count, the most bytes a magnitude selection keeps of its last pass's counts
# per chunk (their non-zero counters: ~16 KiB per 1 Mi-element chunk of bf16 deltas, so 8 MiB
# covers ~500 Mi elements, a 1 GB embedding), so that its masks need not be made in flat order
# (the engine can then combine chunks side by side). Past it, masks go in flat order.
TIE_COUNT_BYTES = 8 << 20
# mergekit: a norm below this is not rescaled (division by ~0).
RESCALE_EPS = 1e-7
# mergekit: without sign election, |sum of weights| below this is treated as 1.
DIVISOR_EPS = 1e-8


class _Model:
    """One model's sparsifier state for the tensor."""

    def __init__(self, index: int, job: TensorJob, family: Family) -> None:
        params = job.model_params[index]
        self.index = index
        self.weight = float(params["weight"])
        self.density = float(params.get("density", 1.0))
        n = job.numel
        self.kind: Literal["keep", "zero", "select", "random", "della"] = "keep"
        self.selector: RankSelector | None = None
        self.counts: tuple[int, ...] = ()
        if family.sparsify is None or self.density >= 1:
            return
        if family.sparsify == "magnitude":
            if self.density <= 0 or n == 0:
                self.kind = "zero"
                return
            # mergekit: a positive density keeps at least one element.
            self.counts = (max(1, int(self.density * n)),)
        elif family.sparsify == "magnitude_outliers":
            gamma = float(params.get("gamma", 0.01))
            target = int(self.density * n)
            n_top = int(gamma * n)
            # Drop the n_top largest, then the smallest down to the density; when both do not
            # fit, fewer of the largest are dropped (mergekit's rule). Keep ranks [top, top+target).
            n_bottom = max(0, n - target - n_top)
            top = n - n_bottom - target
            self.counts = (top + target, top)
        else:
            if family.sparsify == "della_magprune" and self.density <= 0:
                self.kind = "zero"
                return
            self.kind = "random" if family.sparsify == "random" else "della"
            self.key = rng.stream_key(job.seed, job.name, index)
            self.epsilon = float(params.get("epsilon", 0.15))
            self.row = job.row_len or n
            self.work_dtype = torch.float32 if job.dtype == torch.float16 else job.dtype
            return
        self.kind = "select"
        # Room for the last radix pass's counts per chunk: the combine may then take chunks in
        # any order.
        self.selector = RankSelector(n, self.counts, key_space(job.dtype), TIE_COUNT_BYTES)
        if self.selector.passes == 0:
            self.selector.finish_without_passes()

    @property
    def sparsified(self) -> bool:
        return self.kind in ("select", "random", "della")

    @property
    def drawn(self) -> bool:
        """Random masks: drawn and rescaled in mergekit's working dtype."""
        return self.kind in ("random", "della")

    def mask(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """Keep mask (bool) of the next chunk in flat order."""
        if self.kind == "random":
            return rng.keep_mask(self.key, start, delta.numel(), self.density, delta.device)
        if self.kind == "della":
            return self._della_mask(delta, start)
        assert self.selector is not None
        keys = magnitude_keys(delta)
        keep = self.selector.mask(keys, 0, start)
        if len(self.counts) == 2:  # breadcrumbs: not among the top ``top`` (outliers)
            keep.logical_and_(self.selector.mask(keys, 1, start).logical_not_())
        return keep

    def mask_bits(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """:meth:`mask` as an int16 mask, for a 16-bit ``delta`` (:mod:`~.bits`)."""
        if self.kind == "random":
            return rng.keep_bits(self.key, start, delta.numel(), self.density, delta.device)
        if self.kind != "select":
            return bits.from_bool(self.mask(delta, start))
        assert self.selector is not None
        keys = bits.magnitudes(delta)
        keep = self.selector.mask_bits(keys, 0, start)
        if len(self.counts) == 2:  # breadcrumbs: not among the top ``top`` (outliers)
            keep.bitwise_and_(self.selector.mask_bits(keys, 1, start).bitwise_not_())
        return keep

    def _della_mask(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """DELLA's MagPrune: within each row (the chunk holds whole rows), the keep probability
        grows linearly with the rank of |delta| from density - epsilon to density + epsilon;
        mergekit's arithmetic (ranks and probabilities in the working dtype). Ties in |delta|
        rank by index (stable sort; mergekit's argsort orders them arbitrarily)."""
        ranked = row_ranks(delta, self.row).to(self.work_dtype) + 1
        if self.row > 1:
            # Every row holds the ranks 0..row-1, so its min and max after the same conversion
            # and + 1 (mergekit's per-row reductions) are those of 0 and row - 1: rounding to
            # the working dtype keeps the order.
            ends = torch.tensor([0.0, self.row - 1.0], dtype=self.work_dtype) + 1
            low, high = ends[0], ends[1]
            rank_norm = ((ranked - low) / (high - low)).clamp(0, 1)
        else:  # one element per row: mergekit divides 0 by 0 here; the middle probability
            rank_norm = torch.full_like(ranked, 0.5)
        # ``tensor + python float``: the CPU rounds the float to the tensor's dtype first, CUDA
        # adds it in float32; rounding it here gives mergekit's CPU result on every device.
        low_p = torch.tensor(self.density - self.epsilon, dtype=self.work_dtype).item()
        probs = (rank_norm * 2 * self.epsilon).add_(low_p)
        draws = rng.uniform_bits(self.key, start, delta.numel(), delta.device)
        # u < p: u uniform on [0, 2**UNIT_BITS), exact in float32 (p's resolution 2**-24).
        scaled = probs.reshape(-1).to(torch.float32) * float(1 << rng.UNIT_BITS)
        return draws.to(torch.float32) < scaled


class ElectionCounts:
    """A sign election's statistics over a tensor's chunks (thread-safe, on the device: no
    sync per chunk): the models' non-zero elements and those of the elected sign."""

    def __init__(self) -> None:
        self._nonzero: torch.Tensor | None = None
        self._agree: torch.Tensor | None = None
        self._lock = threading.Lock()

    def add(
        self,
        nonzero: Sequence[torch.Tensor],
        agreeing: Sequence[torch.Tensor],
        count: Callable[[torch.Tensor], torch.Tensor] = torch.sum,
    ) -> None:
        """One chunk's masks per model (bool, or int16 ones with ``count=bits.count``)."""
        total = torch.stack([count(nz) for nz in nonzero]).sum()
        agree = torch.stack([count(a) for a in agreeing]).sum()
        with self._lock:
            self._nonzero = total if self._nonzero is None else self._nonzero + total
            self._agree = agree if self._agree is None else self._agree + agree

    def record(self) -> dict[str, int]:
        """``{"agree", "nonzero"}`` for :mod:`shardmerge.mergestats`."""
        return {
            "agree": 0 if self._agree is None else int(self._agree.item()),
            "nonzero": 0 if self._nonzero is None else int(self._nonzero.item()),
        }


class TaskVectorMerge:
    """:class:`~shardmerge.methods.spec.TensorMerge` for one tensor of the family."""

    def __init__(self, job: TensorJob, family: Family) -> None:
        self.job = job
        self.family = family
        self.dtype = job.dtype
        # mergekit's CPU path draws and rescales float16 masks in float32.
        self.random_dtype = torch.float32 if job.dtype == torch.float16 else job.dtype
        self.models = [_Model(i, job, family) for i in range(len(job.model_params))]
        self.rescale = bool(job.shared["rescale"])
        self.normalize = bool(job.shared["normalize"])
        self.lambda_ = float(job.shared["lambda"])
        # 16-bit merges take their masks as int16 bit patterns (the same results, a fraction of
        # bool comparisons' and conversions' cost on a CPU: shardmerge.methods.bits).
        self.bits = job.dtype in bits.SIXTEEN_BIT
        selectors = [m.selector for m in self.models if m.selector is not None]
        self.select_passes = max((s.passes for s in selectors), default=0)
        self.l1_pass = self.rescale and any(m.sparsified for m in self.models)
        self.passes = self.select_passes + (1 if self.l1_pass else 0)
        # Per model, its L1 block sums before and after masking, each at its block's place
        # (float64 outside malloc's heap, heap.outside_heap: 8 bytes a block; as Python floats,
        # 32: 100 MB for the 1 GB embeddings of three fine-tunes), made at the model's first chunk.
        self._l1: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.models)
        self.factors: list[torch.Tensor | None] = [None] * len(self.models)
        # Per model, the tensor's keep masks from the L1 pass for the combine, one bit each
        # (see MASK_CACHE_BYTES).
        self._packed = bits.PackedMasks(job.numel)
        cached = [m for m in self.models if self._bits_path(m)]
        self._cache_masks = self.l1_pass and job.numel * len(cached) <= 8 * MASK_CACHE_BYTES
        # Statistics counted during combine (on the device: no sync per chunk): per sparsified
        # model its kept elements; with sign election, the non-zero weighted elements and those
        # of the elected sign.
        self._kept: list[torch.Tensor | None] = [None] * len(self.models)
        self._election = ElectionCounts()
        self._lock = threading.Lock()  # the counters, when the engine combines chunks at once

    def in_any_order(self, pass_index: int) -> bool:
        """Whether the engine may run this pass's chunks (``passes``: the combine's) side by
        side: the radix counts add up in any order, and so do the L1 blocks (``math.fsum``) and
        the random masks (counter-based). A magnitude mask keeps the elements tied at the
        threshold in flat order: its chunks go in turn unless the selection kept where each
        chunk's ties lie (RankSelector.any_order, asked once the selection passes are done)."""
        if pass_index < self.select_passes:
            return True
        return all(m.selector.any_order for m in self.models if m.selector is not None)

    def _deltas(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        base = inputs[0]
        return [x - base for x in inputs[1:]]

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        deltas = self._deltas(inputs)
        if pass_index < self.select_passes:
            for model, delta in zip(self.models, deltas, strict=True):
                selector = model.selector
                if selector is not None and pass_index < selector.passes:
                    keys = bits.magnitudes(delta) if self.bits else magnitude_keys(delta)
                    selector.add(keys, start)
            return
        # The L1 pass: norms before and after masking, per model.
        for model, delta in zip(self.models, deltas, strict=True):
            if not model.sparsified:
                continue
            work = self._work(model, delta)
            block = model.row if model.kind == "della" else L1_BLOCK  # whole rows per chunk
            before, after = self._l1_sums(model.index, block, delta.device)
            assert start % block == 0, "chunks hold whole L1 blocks (rows)"
            first = start // block
            if not self._bits_path(model):
                masked = work * model.mask(delta, start).to(work.dtype)
                _put(before, first, _block_l1(work, block))
                _put(after, first, _block_l1(masked, block))
                continue
            keep = model.mask_bits(delta, start)
            if self._cache_masks:
                self._packed.put(model.index, start, keep)
            magnitude = work.abs()
            sums = block_sums(magnitude, block)
            if bool(sums.isfinite().all()):
                # |d * 1.0| = |d| and |d * 0.0| = +0 for a finite d: the masked magnitudes are
                # |d|'s bits and the mask's.
                kept = magnitude.view(torch.int16).bitwise_and_(keep).view(work.dtype)
            else:  # an infinity times 0.0 is a NaN (mergekit's norm then is one too)
                kept = (work * bits.ones_where(keep, work.dtype)).abs_()
            _put(before, first, sums)
            _put(after, first, block_sums(kept, block))

    def end_pass(self, pass_index: int) -> None:
        if pass_index < self.select_passes:
            for model in self.models:
                selector = model.selector
                if selector is not None and pass_index < selector.passes:
                    selector.end_pass()
            return
        for i, (model, l1) in enumerate(zip(self.models, self._l1, strict=True)):
            if not model.sparsified or l1 is None:
                continue
            before, after = l1
            dtype = self.random_dtype if model.drawn else self.dtype
            # mergekit sums in the working dtype: the exact sum, rounded to it, is what it gets
            # up to its own float32 accumulation error.
            b = torch.tensor(_exact_total(before), dtype=torch.float64).to(dtype)
            a = torch.tensor(_exact_total(after), dtype=torch.float64).to(dtype)
            if not (b < RESCALE_EPS or a < RESCALE_EPS):
                self.factors[i] = b / a
        self._l1 = [None] * len(self.models)
        for model in self.models:
            if model.selector is not None:
                model.selector.restart()

    def _l1_sums(
        self, index: int, block: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's block sums before and after masking (made at its first chunk)."""
        with self._lock:
            sums = self._l1[index]
            if sums is None:
                blocks = -(-self.job.numel // block)
                sums = self._l1[index] = (
                    heap.outside_heap(blocks, torch.float64, device),
                    heap.outside_heap(blocks, torch.float64, device),
                )
        return sums

    def _work(self, model: _Model, delta: torch.Tensor) -> torch.Tensor:
        return delta.to(self.random_dtype) if model.drawn else delta

    def _bits_path(self, model: _Model) -> bool:
        """Whether the model's masks are int16 ones (a 16-bit merge, worked in its own dtype)."""
        work_dtype = self.random_dtype if model.drawn else self.dtype
        return model.sparsified and self.bits and work_dtype == self.dtype

    def _sparsified(
        self, model: _Model, factor: torch.Tensor | None, delta: torch.Tensor, start: int
    ) -> torch.Tensor:
        if model.kind == "keep":
            return delta
        if model.kind == "zero":
            return torch.zeros_like(delta)
        work = self._work(model, delta)
        if self._bits_path(model):
            keep_bits = self._packed.take(model.index, start, delta.numel())
            if keep_bits is None:
                keep_bits = model.mask_bits(delta, start)
            kept, ones = bits.count(keep_bits), bits.ones_where(keep_bits, work.dtype)
        else:
            keep = model.mask(delta, start)
            kept, ones = keep.sum(), keep.to(work.dtype)
        with self._lock:
            before = self._kept[model.index]
            self._kept[model.index] = kept if before is None else before + kept
        masked = work * ones
        if factor is not None:
            masked = masked * factor
        return masked.to(delta.dtype)

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        base = inputs[0]
        dtype = base.dtype
        if not self.models:
            return base
        # mergekit stacks the deltas and uses sum(dim=0); a merge-dtype sum over dim 0 is a
        # float32 accumulation in model order rounded once, which is what sum_rounded does
        # without the stack (half the memory traffic; the tests check it bit for bit).
        weights = [torch.tensor(m.weight, dtype=dtype, device=base.device) for m in self.models]
        weighted = [
            self._sparsified(model, self.factors[i], delta, start) * weights[i]
            for i, (model, delta) in enumerate(zip(self.models, self._deltas(inputs), strict=True))
        ]
        if self.family.consensus and self.bits:
            mixed, divisor = self._elect_bits(weighted, weights, dtype)
        elif self.family.consensus:
            # The elected sign is that of the summed weighted deltas, zero counting as positive;
            # sign(d) == elected keeps a delta only where it is non-zero and of that sign.
            positive = sum_rounded(weighted, dtype) >= 0
            # (d > 0) == positive, and d != 0: bool ops (torch.where on bools is slow here).
            nonzero = [d != 0 for d in weighted]
            agreeing = [
                (d > 0).eq_(positive).logical_and_(nz)
                for d, nz in zip(weighted, nonzero, strict=True)
            ]
            self._election.add(nonzero, agreeing)
            takes = [t.to(dtype) for t in agreeing]
            # d * take, not a masked fill: a dropped negative delta is -0.0, as in mergekit.
            mixed = sum_rounded([d * t for d, t in zip(weighted, takes, strict=True)], dtype)
            divisor = sum_rounded([t * w for t, w in zip(takes, weights, strict=True)], dtype)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = sum_rounded(weighted, dtype)
            divisor = torch.stack(weights).sum(dim=0)
            if divisor.abs() < DIVISOR_EPS:
                divisor = torch.ones((), dtype=dtype, device=base.device)
        if self.normalize:
            mixed /= divisor
        if self.lambda_ != 1:
            mixed *= self.lambda_
        return (base + mixed).to(dtype)

    def _elect_bits(
        self, weighted: list[torch.Tensor], weights: list[torch.Tensor], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sign election of the bool branch of :meth:`combine`, bit for bit, with int16
        masks: a model takes part where its weighted delta is non-zero and (d > 0) equals
        (sum >= 0)."""
        positive = bits.is_nonneg(sum_rounded(weighted, dtype))
        signs = [bits.nonzero_and_not_positive(d) for d in weighted]
        nonzero = [nz for nz, _ in signs]
        # (d > 0) == positive where d != 0: not-positive differs from positive there.
        agreeing = [other.bitwise_xor_(positive).bitwise_and_(nz) for nz, other in signs]
        self._election.add(nonzero, agreeing, bits.count)
        takes = [bits.ones_where(a, dtype) for a in agreeing]
        mixed = sum_rounded([d * t for d, t in zip(weighted, takes, strict=True)], dtype)
        # The weights taking part: w & mask instead of take * w. Only a zero's sign differs (+0
        # for a negative weight left out), and every zero divisor becomes 1 below.
        taking = [
            a.bitwise_and(w.view(torch.int16)).view(dtype)
            for a, w in zip(agreeing, weights, strict=True)
        ]
        divisor = sum_rounded(taking, dtype)
        return mixed, bits.where_zero_one(divisor)

    def statistics(self) -> dict[str, object]:
        """What combine counted (see :mod:`shardmerge.mergestats`): per model its kept elements
        (None: the method keeps the task vector whole), and the sign election's counts."""
        kept: list[int | None] = []
        for model, count in zip(self.models, self._kept, strict=True):
            if model.kind == "keep":
                kept.append(None)
            else:  # "zero" keeps nothing; a tensor with no elements has no count
                kept.append(0 if count is None else int(count.item()))
        out: dict[str, object] = {"kept": kept}
        if self.family.consensus and self.models:
            out.update(self._election.record())
        return out


def _put(sums: torch.Tensor, first: int, chunk_sums: torch.Tensor) -> None:
    """A chunk's block sums, in their blocks' places (``first``: its first block)."""
    sums[first : first + chunk_sums.numel()] = chunk_sums


def _exact_total(sums: torch.Tensor) -> float:
    """The exactly rounded sum of ``sums`` (``math.fsum``), a piece of Python floats at a time."""
    flat = sums.cpu()
    return math.fsum(
        itertools.chain.from_iterable(flat[s:e].tolist() for s, e in pieces(flat.numel(), 1))
    )


def _block_l1(x: torch.Tensor, block: int = L1_BLOCK) -> torch.Tensor:
    """float64 sums of |x| over consecutive ``block``-element blocks (the last may be short)."""
    return block_sums(x.abs(), block)
