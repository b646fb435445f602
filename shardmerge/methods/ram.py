"""``ram``: Reinforced Agent Merging (arXiv 2601.13572), mergekit 0.1.5's arithmetic.

For base ``b`` and models ``x_i`` with task vectors ``d_i = x_i - b`` (in the merge dtype): a
model contributes to an element where ``|d_i| > epsilon``; where exactly one model does, the
result takes its ``d_i`` whole, where several do, their mean; ``b`` plus that. Elementwise: no
statistics pass. :mod:`shardmerge.methods.ramplus_tl` adds a per-model scale of the unique
contributions, from counts over the whole tensor.

Each chunk runs mergekit's expressions on the stacked task vectors, so the results are its
bytes (tested against mergekit).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch

__all__ = ["METHOD", "RamMerge", "contributions"]


def contributions(
    inputs: Sequence[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mergekit's ``_prepare_ram_vectors`` of one chunk: the stacked task vectors ``(K, n)``, where
    each is above ``epsilon`` in magnitude, how many models are (``(1, n)``), and where more
    than one and exactly one are."""
    import torch

    base = inputs[0]
    vectors = torch.stack([x - base for x in inputs[1:]], dim=0)
    # ``tensor > python float``: the CPU rounds the float to the tensor's dtype first, CUDA
    # compares in float32; rounding it here gives mergekit's CPU result on every device.
    nonzero = vectors.abs() > torch.tensor(epsilon, dtype=base.dtype).item()
    counts = nonzero.sum(dim=0, keepdim=True)
    return vectors, nonzero, counts, counts > 1, counts == 1


class RamMerge:
    """``ram``, and with ``scaled`` the tensor-local RAM+ (its per-model scales of the unique
    contributions come from one counting pass)."""

    def __init__(self, job: TensorJob, scaled: bool = False) -> None:
        import torch

        self.dtype = job.dtype
        # RAM+'s float32 scales make mergekit's result float32: with an output dtype of its
        # own, it goes out unrounded (the engine rounds it once, to that dtype).
        self.result_dtype = torch.float32 if scaled and job.wider_result() else job.dtype
        self.count = len(job.model_params)
        self.epsilon = float(job.shared["epsilon"])
        self.scaled = scaled
        if scaled:
            self.r = float(job.shared["r"])
            self.alpha = float(job.shared["alpha"])
        self.passes = 1 if scaled and job.numel else 0
        self._shared = [0] * self.count  # per model: its contributions shared with another model
        self._unique = [0] * self.count  # and those it makes alone
        self._kept: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self._lock = threading.Lock()

    def in_any_order(self, pass_index: int) -> bool:
        """Counts add up in any order, and every chunk's combine is independent."""
        return True

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        from shardmerge.methods import bits

        found = self._contributions_bits(inputs) if self._bit_patterns(inputs[0]) else None
        if found is not None:
            _, contributes, minus_count = found
            overlap, unique = _overlap_and_unique(minus_count)
            shared = [int(bits.count(c & overlap)) for c in contributes]
            alone = [int(bits.count(c & unique)) for c in contributes]
        else:
            _, nonzero, _, overlap_bool, unique_bool = contributions(inputs, self.epsilon)
            shared = (nonzero & overlap_bool).sum(dim=1).tolist()
            alone = (nonzero & unique_bool).sum(dim=1).tolist()
        with self._lock:
            self._shared = [a + b for a, b in zip(self._shared, shared, strict=True)]
            self._unique = [a + b for a, b in zip(self._unique, alone, strict=True)]

    def end_pass(self, pass_index: int) -> None:
        import torch

        # mergekit: rho = shared / max(unique, epsilon) (float32), lambda = 1 + r clamp(rho, 0,
        # alpha).
        shared = torch.tensor(self._shared, dtype=torch.int64)
        unique = torch.tensor(self._unique, dtype=torch.int64)
        rho = shared / unique.clamp(min=self.epsilon)
        self.scales = 1 + self.r * rho.clamp(min=0, max=self.alpha)

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        base = inputs[0]
        if self._bit_patterns(base):
            merged = self._combine_bits(inputs)
            if merged is not None:
                return merged
        vectors, nonzero, counts, overlap, unique = contributions(inputs, self.epsilon)
        kept = nonzero.sum(dim=1)
        with self._lock:
            self._kept = kept if self._kept is None else self._kept + kept
        contributing = vectors * nonzero
        alone = contributing * unique
        if self.scaled:
            scales = self.scales if self.scales is not None else _ones(self.count, base.device)
            # float32 scales make the sum float32 (mergekit's result too): rounded once below.
            alone = alone * scales.to(base.device).unsqueeze(-1)
        merged = (alone + (contributing * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return (base + merged.reshape_as(base)).to(self.result_dtype)

    def _bit_patterns(self, x: torch.Tensor) -> bool:
        from shardmerge.methods import bits

        return x.dtype in bits.SIXTEEN_BIT and self.epsilon >= 0

    def _contributions_bits(
        self, inputs: Sequence[torch.Tensor], finite_only: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None:
        """:func:`contributions` from bit patterns, for 16-bit merges: the task vectors, each
        one's int16 mask of ``|d| > epsilon`` (epsilon rounded to the merge dtype first, as the
        CPU compares; never for a NaN), and minus the count of contributing models. None with
        ``finite_only`` where a task vector holds an infinity or a NaN."""
        import torch

        from shardmerge.methods import bits

        base = inputs[0]
        dtype = base.dtype
        infinity = bits.INFINITY_BITS[dtype]
        deltas = [x - base for x in inputs[1:]]
        keys = [bits.magnitudes(d) for d in deltas]
        if finite_only and any(int(k.max()) >= infinity for k in keys):
            return None
        threshold = min(int(torch.tensor(self.epsilon, dtype=dtype).view(torch.int16)), 0x7FFF)
        contributes = []
        for k in keys:
            mask = bits.greater(k, threshold)
            if not finite_only:  # |NaN| > epsilon is False
                mask.bitwise_and_(bits.greater(k, infinity).bitwise_not_())
            contributes.append(mask)
        minus_count = contributes[0].clone()  # -1 per contributing model
        for c in contributes[1:]:
            minus_count.add_(c)
        return deltas, contributes, minus_count

    def _combine_bits(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The combine for 16-bit merges from the task vectors' bit patterns: the same bytes
        as mergekit's expressions wherever every task vector is finite (None otherwise: its
        products make NaNs there). ``z`` is a task vector where it contributes and a zero of
        its sign elsewhere (mergekit's product by the bool mask), ``z & unique`` and ``z &
        overlap`` likewise. RAM's term ``z * unique + z * overlap / max(count, 1)`` is then
        ``z / max(count, 1)``: ``z`` itself where it alone contributes (count 1), the other
        product a zero of ``z``'s sign, which the sum keeps. RAM+ scales the first product by
        its float32 scale, so its terms are summed as mergekit sums them."""
        import torch

        from shardmerge.methods import bits
        from shardmerge.methods.sums import sum_rounded

        base = inputs[0]
        dtype = base.dtype
        found = self._contributions_bits(inputs, finite_only=True)
        if found is None:
            return None
        deltas, contributes, minus_count = found
        kept = torch.stack([bits.count(c) for c in contributes])
        with self._lock:
            self._kept = kept if self._kept is None else self._kept + kept
        zs = [_masked(d, c) for d, c in zip(deltas, contributes, strict=True)]
        divisor = minus_count.neg().clamp_(min=1).to(dtype)
        if not self.scaled:
            return base + sum_rounded([z / divisor for z in zs], dtype)
        overlap, unique = _overlap_and_unique(minus_count)
        scales = self.scales if self.scales is not None else _ones(self.count, base.device)
        terms = [
            _masked(z, unique).float() * scale + (_masked(z, overlap) / divisor).float()
            for z, scale in zip(zs, scales.to(base.device).unbind(), strict=True)
        ]
        merged = torch.stack(terms).sum(dim=0)
        return (base + merged).to(self.result_dtype)

    def statistics(self) -> dict[str, object]:
        """Per model, the elements where it contributes (:mod:`shardmerge.mergestats`), and
        RAM+'s scale of its unique contributions as its weight."""
        kept = [0] * self.count if self._kept is None else [int(k) for k in self._kept.tolist()]
        out: dict[str, object] = {"kept": kept}
        if self.scaled and self.scales is not None:
            out["weights"] = [float(s) for s in self.scales.tolist()]
        return out


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` for a finite 16-bit ``x`` and an int16 mask: ``x`` where set, a zero of its
    sign elsewhere."""
    import torch

    return x.view(torch.int16).bitwise_and(mask.bitwise_or(-0x8000)).view(x.dtype)


def _overlap_and_unique(minus_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 masks of more than one and of exactly one contributing model, from minus the
    count: ``1 - count`` is negative past one, and ``x | -x`` has its sign set unless x is 0."""
    shifted = minus_count.add(1)  # 1 - count
    overlap = shifted.bitwise_right_shift(15)
    unique = shifted.bitwise_or(shifted.neg()).bitwise_right_shift_(15).bitwise_not_()
    return overlap, unique


def _ones(count: int, device: torch.device) -> torch.Tensor:
    import torch

    return torch.ones(count, dtype=torch.float32, device=device)  # an empty tensor: no pass


METHOD = MethodSpec(
    name="ram",
    base="required",
    params=(Param("epsilon", per_model=False, default=1e-5),),
    start=RamMerge,
    summary="RAM: each element's contributing task vectors, whole where one, averaged where several",
)
