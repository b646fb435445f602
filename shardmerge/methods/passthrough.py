"""``passthrough``: one input copied as it is (or times ``scale``), mergekit 0.1.5's semantics.

Used with ``slices:`` to stack layers of one or several models (depth up-scaling). Without a
``scale`` (or with 1) the engine copies the stored bytes (converted only when the output dtype
differs); a scale multiplies in the merge dtype, as mergekit does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch


class PassthroughMerge:
    passes = 0

    def __init__(self, job: TensorJob) -> None:
        if len(job.model_params) != 1:
            raise ValueError(f"tensor {job.name!r}: passthrough takes exactly one input")
        self.scale = float(job.model_params[0]["scale"])

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        raise AssertionError("passthrough has no reduction pass")

    def end_pass(self, pass_index: int) -> None:
        raise AssertionError("passthrough has no reduction pass")

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        (x,) = inputs
        return x * self.scale


def _copies(params: Mapping[str, float]) -> bool:
    # x * 1.0 == x exactly, so the bytes can go straight through.
    return params.get("scale", 1.0) == 1.0


METHOD = MethodSpec(
    name="passthrough",
    base="none",
    params=(Param("scale", per_model=True, default=1.0),),
    start=PassthroughMerge,
    summary="copies one model's tensors (with slices: stacks layers of several models)",
    copies=_copies,
)
