"""``ramplus_tl``: RAM+ computed per tensor (mergekit 0.1.5's "tensor-local" RAM+).

As :mod:`shardmerge.methods.ram`, but a model's unique contributions (the elements where it alone
changes the base by more than ``epsilon``) are scaled by ``1 + r * clamp(rho, 0, alpha)``, with
``rho`` its shared contributions over its unique ones in the whole tensor (``max(unique,
epsilon)`` below). One counting pass, then the combine; mergekit's float32 scale makes the sum
float32, rounded once to the merge dtype (mergekit writes it as float32), or to ``out_dtype``
where the recipe sets one (mergekit rounds its float32 result to it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    from shardmerge.methods.ram import RamMerge


def start(job: TensorJob) -> RamMerge:
    from shardmerge.methods.ram import RamMerge

    return RamMerge(job, scaled=True)


METHOD = MethodSpec(
    name="ramplus_tl",
    base="required",
    params=(
        Param("r", per_model=False, default=0.1),
        Param("alpha", per_model=False, default=0.2),
        Param("epsilon", per_model=False, default=1e-5),
    ),
    start=start,
    summary="RAM+: RAM with each model's unique contributions scaled by how much it shares",
)
