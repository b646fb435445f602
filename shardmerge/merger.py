"""``SLERPModelMerger``: SLERP-merge two in-memory ``nn.Module`` models of the same architecture.

A drop-in for the documented ``zeta.nn.SLERPModelMerger`` API without its defects: the math is
:func:`shardmerge.slerp.slerp` (finite for identical, parallel and zero tensors; float32 angle with
float64 sums; integer buffers by rounded lerp; any memory layout), buffers are merged along with
parameters, and the inputs are never modified, registered or shared with the result.
"""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
import typing
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from shardmerge.slerp import check_t, slerp

__all__ = ["SLERPModelMerger"]

_F = TypeVar("_F", bound=Callable[..., Any])


def enforce_types(func: _F) -> _F:
    """Check at call time that each annotated argument is an instance of its annotation.

    Annotations must be plain classes; ``float`` accepts any real number (ints, numpy scalars
    such as ``np.float32``), and numbers exclude bool.

    Raises:
        TypeError: an argument of the wrong type (naming the argument), at call time.
    """
    signature = inspect.signature(func)
    hints = typing.get_type_hints(func)
    hints.pop("return", None)
    accepted: dict[str, tuple[type, ...]] = {}
    for name, hint in hints.items():
        if not isinstance(hint, type):
            raise TypeError(f"enforce_types supports plain class annotations, got {hint!r}")
        # PEP 484's numeric tower, widened to numbers.Real: numpy registers its scalars there, so
        # np.float32(0.5) passes as np.float64 (a float subclass) already did.
        accepted[name] = (numbers.Real,) if hint is float else (hint,)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            types = accepted.get(name)
            if types is None:
                continue
            # bool is an int subclass, but True/False as a number is almost always a mistake.
            if not isinstance(value, types) or (numbers.Real in types and isinstance(value, bool)):
                expected = "int or float" if numbers.Real in types else types[0].__name__
                raise TypeError(
                    f"{func.__qualname__}() argument {name!r} must be {expected}, "
                    f"got {type(value).__name__}"
                )
        return func(*args, **kwargs)

    return cast(_F, wrapper)


class SLERPModelMerger(nn.Module):
    """Merge two models of the same architecture by spherical linear interpolation (SLERP).

    Every tensor of the state dict (parameters and buffers) is merged as one vector with
    :func:`shardmerge.slerp.slerp`; integer buffers such as BatchNorm's ``num_batches_tracked``
    take the rounded linear interpolation. The result is a deep copy of ``model1`` (so modules
    whose constructors need arguments work), keeping its dtypes, memory formats, tied parameters,
    ``requires_grad`` flags and non-persistent buffers. The inputs are held by reference but not
    registered as submodules: ``merger.half()`` or ``merger.to(...)`` leave them alone.

    Args:
        model1: the t=0 end; the result copies its structure.
        model2: the t=1 end; same tensor names and shapes as ``model1``.
        t: interpolation factor in [0, 1] (0 gives ``model1``, 1 gives ``model2``).

    Raises:
        TypeError: a model is not an ``nn.Module``, or t is not an int or float.
        ValueError: t is outside [0, 1] or NaN.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from shardmerge import SLERPModelMerger
        >>> model1, model2 = nn.Linear(10, 10), nn.Linear(10, 10)
        >>> merged = SLERPModelMerger(model1, model2, t=0.5).merge()
        >>> merged(torch.randn(2, 10)).shape
        torch.Size([2, 10])
    """

    model1: nn.Module
    model2: nn.Module

    @enforce_types
    def __init__(self, model1: nn.Module, model2: nn.Module, t: float = 0.5) -> None:
        super().__init__()
        t = float(t)  # a numpy or other real scalar becomes a plain float
        check_t(t)
        self.model1 = model1
        self.model2 = model2
        self.t = t

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("model1", "model2"):
            # Bypass nn.Module's registration, so the merger's .half(), .to(), .parameters() and
            # .state_dict() never reach the caller's models (also after reassignment).
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"t={self.t}"

    @enforce_types
    def merge(self) -> nn.Module:
        """Return a new model holding the SLERP of both models' parameters and buffers.

        Raises:
            ValueError: the models' tensor names, shapes or kinds differ (every difference is
                listed in one message), or t is outside [0, 1].
        """
        state1 = _tensors(self.model1)
        state2 = _tensors(self.model2)
        problems = _mismatches(state1, state2)
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise ValueError(
                f"cannot merge: {len(problems)} tensors differ between model1 and model2:\n{lines}"
            )
        merged = self._copy_model_structure(self.model1)
        targets = _tensors(merged)
        written: set[int] = set()
        with torch.no_grad():
            for name, target in targets.items():
                # Tied tensors are one object in the copy: merge and write each only once.
                if id(target) in written:
                    continue
                written.add(id(target))
                value = self._slerp(state1[name], state2[name], self.t)
                # In place, one tensor at a time: keeps the copy's dtype, layout and ties, and
                # holds at most one merged tensor beyond the result.
                target.copy_(value)
        return merged

    @staticmethod
    @enforce_types
    def _slerp(w1: Tensor, w2: Tensor, t: float) -> Tensor:
        """SLERP of two same-shape tensors; see :func:`shardmerge.slerp.slerp`."""
        return slerp(w1, w2, float(t))

    @staticmethod
    @enforce_types
    def _copy_model_structure(model: nn.Module) -> nn.Module:
        """An independent deep copy of ``model`` (works whatever its constructor needs)."""
        return copy.deepcopy(model)


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state-dict tensors as the live objects (tied tensors appear once per name)."""
    # keep_vars=True returns the parameters themselves, so ties show up as shared identities;
    # non-tensor extra state is left to the deep copy.
    state = model.state_dict(keep_vars=True)
    return {name: value for name, value in state.items() if isinstance(value, Tensor)}


def _mismatches(state1: dict[str, Tensor], state2: dict[str, Tensor]) -> list[str]:
    """Every difference that prevents a merge, each naming its tensor and both sides."""

    def shape(state: dict[str, Tensor], name: str) -> str:
        return str(tuple(state[name].shape)) if name in state else "missing"

    problems = []
    for name in [*state1, *(n for n in state2 if n not in state1)]:
        if name not in state1 or name not in state2 or state1[name].shape != state2[name].shape:
            problems.append(f"{name}: model1 {shape(state1, name)} vs model2 {shape(state2, name)}")
        elif state1[name].is_floating_point() != state2[name].is_floating_point():
            problems.append(
                f"{name}: model1 {state1[name].dtype} vs model2 {state2[name].dtype} "
                "(cannot merge floating point with non-floating point)"
            )
    if problems:
        return problems
    # A tie in model1 becomes a tie in the result, so model2 must hold one value for it too.
    first_name: dict[int, str] = {}
    for name, tensor in state1.items():
        first = first_name.setdefault(id(tensor), name)
        other, mine = state2[first], state2[name]
        if first != name and other is not mine and not torch.equal(other, mine):
            problems.append(f"{name}: tied to {first} in model1 but differs from it in model2")
    return problems
