"""Merge methods: one module each, registered here by mergekit's name.

Adding a method: write ``shardmerge/methods/<name>.py`` exposing ``METHOD`` (a
:class:`~shardmerge.methods.spec.MethodSpec`: parameters, base policy, and the per-tensor
passes + combine), then add it to ``_MODULES`` below. Recipes, planning, the engine, verify
and the card pick it up from the registry.
"""

from __future__ import annotations

from shardmerge.methods import (
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from shardmerge.methods.spec import MethodSpec, Param, TensorJob, TensorMerge

__all__ = ["METHODS", "MethodSpec", "Param", "TensorJob", "TensorMerge", "get_method"]

_MODULES = (
    slerp,
    linear,
    task_arithmetic,
    ties,
    dare_ties,
    dare_linear,
    breadcrumbs,
    breadcrumbs_ties,
    della,
    della_linear,
    model_stock,
    nuslerp,
    karcher,
    multislerp,
    nearswap,
    sce,
    arcee_fusion,
    ram,
    ramplus_tl,
    passthrough,
)
METHODS: dict[str, MethodSpec] = {m.METHOD.name: m.METHOD for m in _MODULES}
# mergekit methods deliberately not (yet) implemented: named in the error, not silently ignored.
# Empty: every method of mergekit 0.1.5 is implemented.
NOT_IMPLEMENTED: tuple[str, ...] = ()


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``.

    Raises:
        KeyError: with a message listing the supported methods.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(unknown_method_message(name)) from None


def unknown_method_message(name: str) -> str:
    supported = ", ".join(sorted(METHODS))
    if name in NOT_IMPLEMENTED:
        return f"{name!r} is not supported by shardmerge yet; supported methods: {supported}"
    return f"unknown merge method {name!r}; supported methods: {supported}"
