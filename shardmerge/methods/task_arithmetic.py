"""``task_arithmetic``: base + lambda * sum of weighted task vectors (see :mod:`shardmerge.methods.task_vectors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardmerge.methods.family import Family, family_params
from shardmerge.methods.spec import MethodSpec, TensorJob

if TYPE_CHECKING:
    from shardmerge.methods.task_vectors import TaskVectorMerge

FAMILY = Family(sparsify=None, consensus=False, normalize=False, rescale=False)


def start(job: TensorJob) -> TaskVectorMerge:
    from shardmerge.methods.task_vectors import TaskVectorMerge

    return TaskVectorMerge(job, FAMILY)


METHOD = MethodSpec(
    name="task_arithmetic",
    base="required",
    params=family_params(FAMILY),
    start=start,
    summary="base + lambda * sum of weighted task vectors",
    uses_seed=False,
)
