"""What a merge method declares, and what the streaming engine asks of it per tensor.

A method module exposes one :class:`MethodSpec`: its parameters (per model or shared, with
their defaults and ranges), whether it needs a base model, and ``start``, which makes a
:class:`TensorMerge` for one tensor. The engine then streams the tensor's K aligned inputs
through it: ``passes`` reduction sweeps over the chunks in flat order (each followed by
``end_pass``), then one sweep of ``combine`` whose outputs are written. A method never sees a
whole large tensor, files or threads; the engine never knows which method it runs.

Specs import no torch (``validate`` and ``plan`` never load it): a method's ``start`` imports
its implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["MethodSpec", "Param", "TensorJob", "TensorMerge"]


@dataclass(frozen=True)
class Param:
    """One parameter: ``per_model`` ones are given per (non-base) model, the others once."""

    name: str
    per_model: bool
    default: float | bool | None  # None: required
    kind: Literal["float", "bool"] = "float"
    low: float | None = None  # inclusive bounds, checked per tensor after scheduling
    high: float | None = None
    integer: bool = False  # a whole number (karcher's max_iter)

    def out_of_range(self, value: float) -> str | None:
        """Why ``value`` is outside the parameter's bounds (or not whole), or None."""
        if self.integer and value != int(value):
            return f"{value:g} is not a whole number"
        if self.low is not None and value < self.low:
            if self.high is None:
                return f"{value:g} is below the minimum {self.low:g}"
        elif self.high is not None and value > self.high:
            if self.low is None:
                return f"{value:g} is above the maximum {self.high:g}"
        else:
            return None
        return f"{value:g} is outside [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class TensorJob:
    """One tensor as a method sees it: size, merge dtype and its resolved parameters.

    ``model_params[i]`` belongs to the i-th merged model, in recipe order (the base excluded);
    the inputs the method gets are ``[base, model 0, model 1, ...]`` when it uses a base,
    else ``[model 0, model 1, ...]``.
    """

    name: str
    numel: int
    dtype: torch.dtype  # the merge dtype: every input is cast to it first (mergekit's `dtype`)
    model_params: tuple[Mapping[str, float], ...]
    shared: Mapping[str, float | bool]
    seed: int
    device: Any = "cpu"  # a torch.device or its name
    row_len: int = 0  # elements per row (the last dimension; a 1-D tensor is one row)
    shape: tuple[int, ...] = ()  # the tensor's shape (empty: unknown, treat it as flat)
    # The dtype written (the recipe's ``out_dtype``); None: the merge dtype. A method whose
    # mergekit result is wider than the merge dtype (float32 promotion) returns that result
    # when this differs, so it is rounded once, to this dtype, as mergekit rounds it.
    out_dtype: Any = None

    def wider_result(self) -> bool:
        """Whether a float32 result should be returned unrounded: the output dtype is set and
        is not the merge dtype (the engine rounds the combine's result to it)."""
        return self.out_dtype is not None and self.out_dtype != self.dtype


class TensorMerge(Protocol):
    """One tensor's merge, driven by the engine chunk by chunk."""

    passes: int  # reduction sweeps before the combine sweep

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        """Add one chunk (flat, in the merge dtype, elements ``start ..``) to pass ``pass_index``."""

    def end_pass(self, pass_index: int) -> None:
        """Every chunk of the pass is in."""

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        """The merged chunk (flat), in the merge dtype; chunks arrive in flat order, unless
        the merge says they may come in any order (below)."""

    # Optional: ``in_any_order(pass_index) -> bool`` (``pass_index == passes``: the combine).
    # True lets the engine run that phase's chunks side by side, in any order, from several
    # threads: the merge then makes its state updates thread-safe and their result independent
    # of the order. Without it (or False) the phase's chunks come one at a time in flat order.


@dataclass(frozen=True)
class MethodSpec:
    name: str
    base: Literal["required", "optional", "none"]  # "optional": used when given (linear)
    params: tuple[Param, ...]
    start: Callable[[TensorJob], TensorMerge]
    summary: str
    uses_seed: bool = False
    row_aligned: bool = False  # chunks hold whole rows (per-row statistics)
    min_models: int = 1  # merged models (the base excluded)
    max_models: int | None = None
    # Per model: a problem with the combination of its parameter values, or None.
    check: Callable[[dict[str, float]], str | None] | None = None
    # One input whose parameters make the output that input (passthrough without a scale):
    # the engine copies its bytes instead of running the combine.
    copies: Callable[[Mapping[str, float]], bool] | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def per_model(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def shared(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)
