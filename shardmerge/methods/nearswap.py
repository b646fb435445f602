"""``nearswap``: take the model's value where it is near the base's, keep the base's elsewhere.

For base ``a`` and one model ``b``, element by element: ``w = clamp(t / max(|a - b|, 1e-6), 0,
1)`` and the result ``w b + (1 - w) a``: elements closer than ``t`` become the model's, farther
ones move towards it by ``t / |a - b|``. mergekit 0.1.5's ops, in the merge dtype; no pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch

DIFF_MIN = 1e-6  # mergekit: |a - b| is clamped to this before dividing (equal elements: w = 1)


class NearSwapMerge:
    passes = 0

    def __init__(self, job: TensorJob) -> None:
        self.t = float(job.shared["t"])

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        raise AssertionError("nearswap has no reduction pass")

    def end_pass(self, pass_index: int) -> None:
        raise AssertionError("nearswap has no reduction pass")

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        a, b = inputs
        weight = (self.t / (a - b).abs().clamp(min=DIFF_MIN)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * a


METHOD = MethodSpec(
    name="nearswap",
    base="required",
    params=(Param("t", per_model=False, default=None),),
    start=NearSwapMerge,
    summary="the model's value where it is within t of the base's, a step towards it elsewhere",
    max_models=1,
)
