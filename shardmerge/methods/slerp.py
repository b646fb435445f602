"""``slerp``: spherical interpolation of two models (the math is :mod:`shardmerge.slerp`).

The streaming pipeline runs SLERP on the engine's dedicated two-input fast path
(:func:`shardmerge.engine.execute_plan`); this module is the same math in the pass form every
method has (one reduction pass for the dot product and norms, then the combine), for the pass
engine and its tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch


class SlerpMerge:
    passes = 1

    def __init__(self, job: TensorJob) -> None:
        from shardmerge import slerp as math_  # torch: imported on first use, not by the spec

        self.math = math_
        self.t = float(job.shared["t"])
        self.stats = math_.SlerpStats()
        self.s0 = self.s1 = 0.0

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        part = self.math.SlerpStats()
        self.math.accumulate(part, inputs[0], inputs[1])
        self.stats.add(part)

    def end_pass(self, pass_index: int) -> None:
        self.s0, self.s1 = self.math.coefficients(self.stats, self.t)

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        out = inputs[0].new_empty(inputs[0].shape)
        scratch = self.math.pair_buffer(inputs[0].numel(), inputs[0].device)
        return self.math.combine_chunk(out, inputs[0], inputs[1], self.s0, self.s1, scratch, sub=0)


METHOD = MethodSpec(
    name="slerp",
    base="required",
    params=(Param("t", per_model=False, default=None, low=0.0, high=1.0),),
    start=SlerpMerge,
    summary="spherical interpolation of two models (base = the t = 0 end)",
)
