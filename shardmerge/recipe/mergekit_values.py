"""mergekit's per-model values, shared by its ``models:`` and ``slices:`` forms.

Model references (``org/name@rev``; LoRA ``model+lora`` refused), ``layer_range``, ``t`` and any
method parameter given as a number, a gradient list or a list of ``{filter, value}``
conditions, and the per-model ``parameters`` blocks with the keys mergekit reads.
"""

from __future__ import annotations

import difflib
from typing import Any

from shardmerge.recipe.checks import Check, at, check_param_range, describe, split_revision
from shardmerge.recipe.model import ModelRef
from shardmerge.schedule import Gradient, Rule, Schedule, TValue

_T_UNDER_MODEL = (
    "slerp's t is a global parameter, which mergekit silently ignores here; move it to the "
    "top-level parameters (or the slice's parameters)"
)


def mk_ref(value: Any, path: str, check: Check) -> ModelRef | None:
    """A mergekit model reference: "org/name", a path, or either with "@revision"."""
    text = check.string(value, path, "a model reference (org/name or a local path)")
    if text is None:
        return None
    if "+" in text:
        check.add(
            path,
            f"{text!r} is a LoRA reference (model+lora), which is not supported; merge the "
            "adapter into its base first (e.g. peft's merge_and_unload) and reference the result",
        )
        return None
    return split_revision(text, path, check)


def mk_model_parameters(value: Any, path: str, check: Check) -> None:
    """Per-model parameters: slerp has none, and a t here is the classic silent mistake."""
    params = check.mapping(value, path)
    if params is None:
        return
    for key in params:
        if key == "t":
            check.add(at(path, "t"), _T_UNDER_MODEL)
        elif key in _MK_KNOWN_PARAMS:  # e.g. a weight left in a config made from a template
            check.warnings.append(
                f"{at(path, key)}: ignored; slerp takes no per-model parameters (mergekit "
                "ignores it too)"
            )
        else:
            check.add(at(path, key), "slerp takes no per-model parameters (only a global t)")


def mk_layer_range(value: Any, path: str, check: Check) -> tuple[int, int] | None:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        check.add(path, f"expected [start, end] (two integers), got {describe(value)}")
        return None
    start, end = value
    if not 0 <= start < end:
        check.add(path, f"[{start}, {end}] is empty or negative; it is half-open: [start, end)")
        return None
    return start, end


def mk_t(
    value: Any, path: str, check: Check, bounded: bool = True
) -> tuple[list[Rule], TValue | None]:
    """(rules, fallback) of a mergekit parameter value: number, gradient or conditions."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _mk_conditions(value, path, check, bounded)
    if isinstance(value, list):
        if any(isinstance(v, dict) for v in value):
            check.add(path, "mixes numbers (a gradient) with {filter, value} conditions")
            return [], None
        return [], check.gradient(value, path, bounded)
    if isinstance(value, dict):
        check.add(
            path,
            "expected a number, a list of numbers (gradient) or a list of {filter, value} "
            "conditions, got a mapping",
        )
        return [], None
    return [], check.t(value, path, bounded)


def _mk_conditions(
    items: list[dict[Any, Any]], path: str, check: Check, bounded: bool = True
) -> tuple[list[Rule], TValue | None]:
    rules: list[Rule] = []
    default: TValue | None = None
    fallback_at: str | None = None
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        check.keys(item, where, ("filter", "value"))
        if "value" not in item:
            check.add(at(where, "value"), "missing; a number or a list of numbers (gradient)")
            continue
        raw = item["value"]
        value: float | Gradient | None
        if isinstance(raw, list):
            value = check.gradient(raw, at(where, "value"), bounded)
        else:
            value = check.t(raw, at(where, "value"), bounded)
        pattern = item.get("filter")
        is_fallback = pattern is None or pattern == "*"
        if not is_fallback:
            pattern = check.string(pattern, at(where, "filter"), "a substring of tensor names")
        if fallback_at is not None:
            # mergekit tries conditions in order, so nothing after a fallback is ever reached.
            check.warnings.append(
                f"{where} is never used: the fallback at {fallback_at} matches every tensor first"
            )
            continue
        if value is None:
            continue
        if is_fallback:
            fallback_at = where
            default = value
        elif isinstance(pattern, str):
            rule = Rule(pattern=pattern, kind="substring", value=value, label=pattern, where=where)
            rules.append(rule)
    return rules, default


# Parameter names mergekit methods take: under a method that does not use one, mergekit ignores
# it (configs made from templates carry them), so shardmerge warns instead of refusing.
_MK_KNOWN_PARAMS = (
    "t", "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask",
    "filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "nuslerp_weight", "select_topk",
    "max_iter", "tol", "eps", "scale", "consensus_method",
)  # fmt: skip


def mk_method_params(
    value: Any, path: str, spec: Any, check: Check, *, top: bool
) -> tuple[dict[str, Schedule], dict[str, Schedule | bool]]:
    """(per-model parameters, shared parameters) of one parameters: block."""
    per_model: dict[str, Schedule] = {}
    shared: dict[str, Schedule | bool] = {}
    params = check.mapping(value, path)
    if params is None:
        return per_model, shared
    names = [p.name for p in spec.params]
    for key, raw in params.items():
        where = at(path, key)
        param = spec.param(str(key))
        if param is None:
            if key in _MK_KNOWN_PARAMS:
                check.warnings.append(f"{where}: ignored; {spec.name} does not use {key}")
            else:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "expected one of " + ", ".join(names)
                )
                check.add(where, f"unknown parameter for {spec.name}; {hint}")
            continue
        if not param.per_model and not top:
            check.warnings.append(
                f"{where}: ignored; {key} is shared by all models in {spec.name} (mergekit "
                "ignores it here): put it under the top-level parameters"
            )
            continue
        if param.kind == "bool":
            flag = check.boolean(raw, where)
            if flag is not None:
                shared[param.name] = flag
            continue
        rules, default = mk_t(raw, where, check, bounded=False)
        schedule = Schedule(rules=tuple(rules), default=default, non_layer=None, style="mergekit")
        check_param_range(param, schedule, where, check)
        if param.per_model:
            per_model[param.name] = schedule
        else:
            shared[param.name] = schedule
    return per_model, shared
