"""``breadcrumbs_ties``: breadcrumbs with sign election (see :mod:`shardmerge.methods.task_vectors`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardmerge.methods.family import Family, family_params
from shardmerge.methods.spec import MethodSpec, TensorJob

if TYPE_CHECKING:
    from shardmerge.methods.task_vectors import TaskVectorMerge

FAMILY = Family(sparsify="magnitude_outliers", consensus=True, normalize=False, rescale=False)


def start(job: TensorJob) -> TaskVectorMerge:
    from shardmerge.methods.task_vectors import TaskVectorMerge

    return TaskVectorMerge(job, FAMILY)


METHOD = MethodSpec(
    name="breadcrumbs_ties",
    base="required",
    params=family_params(FAMILY),
    start=start,
    summary="breadcrumbs with sign election",
    uses_seed=False,
)
