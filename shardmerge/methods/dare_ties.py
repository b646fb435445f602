"""``dare_ties``: DARE random drop and L1 rescale, sign election (see :mod:`shardmerge.methods.task_vectors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardmerge.methods.family import Family, family_params
from shardmerge.methods.spec import MethodSpec, TensorJob

if TYPE_CHECKING:
    from shardmerge.methods.task_vectors import TaskVectorMerge

FAMILY = Family(sparsify="random", consensus=True, normalize=False, rescale=True)


def start(job: TensorJob) -> TaskVectorMerge:
    from shardmerge.methods.task_vectors import TaskVectorMerge

    return TaskVectorMerge(job, FAMILY)


METHOD = MethodSpec(
    name="dare_ties",
    base="required",
    params=family_params(FAMILY),
    start=start,
    summary="DARE random drop and L1 rescale, sign election",
    uses_seed=True,
)
