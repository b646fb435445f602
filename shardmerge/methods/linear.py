"""``linear``: the weighted average of the models (no base), mergekit 0.1.5's arithmetic.

``sum_i w_i x_i`` accumulated in float32 (float64 for float64 inputs) in model order, divided
by ``sum_i w_i`` when ``normalize`` (the default), then rounded to the merge dtype. Unlike
mergekit, weights summing to zero with ``normalize`` are an error (mergekit writes inf/NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch


class LinearMerge:
    passes = 0

    def __init__(self, job: TensorJob) -> None:
        import torch  # here, not at the top: recipes and plans import the spec without torch

        acc = torch.float64 if job.dtype == torch.float64 else torch.float32
        self.acc = acc
        self.weights = torch.tensor([float(p["weight"]) for p in job.model_params], dtype=acc)
        self.normalize = bool(job.shared["normalize"])
        self.denominator = self.weights.sum()
        if self.normalize and float(self.denominator) == 0.0:
            raise ValueError(
                f"tensor {job.name!r}: the weights sum to 0, and normalize divides by their sum"
            )

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        raise AssertionError("linear has no reduction pass")

    def end_pass(self, pass_index: int) -> None:
        raise AssertionError("linear has no reduction pass")

    def in_any_order(self, pass_index: int) -> bool:
        """Chunks are independent: the engine may combine several at once."""
        return True

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        import torch

        first = inputs[0]
        result = torch.zeros_like(first, dtype=self.acc)
        for x, w in zip(inputs, self.weights.tolist(), strict=True):
            # A 0-dim coefficient of the accumulation dtype, as mergekit's per-row coefficients.
            result.addcmul_(x, torch.tensor(w, dtype=self.acc, device=x.device))
        if self.normalize:
            result.div_(self.denominator.to(result.device))
        return result.to(first.dtype)


METHOD = MethodSpec(
    name="linear",
    base="none",
    params=(
        Param("weight", per_model=True, default=None),
        Param("normalize", per_model=False, default=True, kind="bool"),
    ),
    start=LinearMerge,
    summary="weighted average of the models",
)
