"""``della_linear``: DELLA without sign election (see :mod:`shardmerge.methods.task_vectors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardmerge.methods.family import Family, check_della, family_params
from shardmerge.methods.spec import MethodSpec, TensorJob

if TYPE_CHECKING:
    from shardmerge.methods.task_vectors import TaskVectorMerge

FAMILY = Family(sparsify="della_magprune", consensus=False, normalize=False, rescale=True)


def start(job: TensorJob) -> TaskVectorMerge:
    from shardmerge.methods.task_vectors import TaskVectorMerge

    return TaskVectorMerge(job, FAMILY)


METHOD = MethodSpec(
    name="della_linear",
    base="required",
    params=family_params(FAMILY),
    start=start,
    summary="DELLA without sign election",
    uses_seed=True,
    row_aligned=True,
    check=check_della,
)
