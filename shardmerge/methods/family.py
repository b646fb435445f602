"""The task-vector family's members and parameters (no torch: recipes and plans use it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shardmerge.methods.spec import Param

__all__ = ["Family", "Sparsify", "family_params"]

Sparsify = Literal["magnitude", "magnitude_outliers", "random", "della_magprune"] | None


@dataclass(frozen=True)
class Family:
    """One member of the family: how it sparsifies, whether it elects signs, its defaults."""

    sparsify: Sparsify
    consensus: bool
    normalize: bool
    rescale: bool


def family_params(family: Family) -> tuple[Param, ...]:
    params = [
        Param("weight", per_model=True, default=None),
        Param("density", per_model=True, default=1.0, low=0.0, high=1.0),
        Param("normalize", per_model=False, default=family.normalize, kind="bool"),
        Param("rescale", per_model=False, default=family.rescale, kind="bool"),
        Param("lambda", per_model=False, default=1.0),
        # Accepted for compatibility: it makes mergekit's sign mask int8; the result is the same.
        Param("int8_mask", per_model=False, default=False, kind="bool"),
    ]
    if family.sparsify == "della_magprune":
        params.append(Param("epsilon", per_model=True, default=0.15, low=0.0, high=1.0))
    if family.sparsify == "magnitude_outliers":
        params.append(Param("gamma", per_model=True, default=0.01, low=0.0, high=1.0))
    return tuple(params)


def check_della(values: dict[str, float]) -> str | None:
    """DELLA's keep probabilities density - epsilon .. density + epsilon must lie in (0, 1)."""
    density, epsilon = values.get("density", 1.0), values.get("epsilon", 0.15)
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return (
            f"density {density:g} +/- epsilon {epsilon:g} must stay inside (0, 1) (the keep "
            "probabilities)"
        )
    return None
