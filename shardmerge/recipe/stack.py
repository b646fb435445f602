"""Layer stacks in a recipe: mergekit's ``slices:`` and our format's ``layers:``.

Called by :mod:`shardmerge.recipe.mergekit` and :mod:`shardmerge.recipe.ours`; the stack
itself (renumbering, which output layer comes from where) is :mod:`shardmerge.slices`. Every
problem is added to the recipe's collector with its key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardmerge.recipe.checks import Check, at, describe, with_fallback
from shardmerge.recipe.mergekit_values import (
    mk_layer_range,
    mk_method_params,
    mk_model_parameters,
    mk_ref,
    mk_t,
)
from shardmerge.recipe.model import ModelRef
from shardmerge.schedule import Rule, Schedule, TValue
from shardmerge.slices import Slice, SliceSource, parse_span

PASSTHROUGH = "passthrough"


@dataclass
class StackParse:
    """The models a stack names (the base first, when there is one) and its slices."""

    models: list[ModelRef]
    keys: list[str]  # where each model is first named
    slices: list[Slice]


def _register(found: StackParse, ref: ModelRef, key: str) -> int:
    for i, seen in enumerate(found.models):
        if seen == ref:
            return i
    found.models.append(ref)
    found.keys.append(key)
    return len(found.models) - 1


def mk_slices(
    value: Any,
    check: Check,
    *,
    method: str,
    spec: Any,  # the MethodSpec; None for slerp
    base: ModelRef | None,
    top_t: Any = None,
    has_top_t: bool = False,
    top_model: Mapping[str, Schedule] | None = None,
    top_shared: Mapping[str, Schedule | bool] | None = None,
) -> StackParse | None:
    """mergekit's ``slices:``: any number of slices, each with sources of (model, layer_range)
    and parameters at the slice and source level (falling back on the top level)."""
    if not isinstance(value, list) or not value:
        check.add("slices", f"expected a non-empty list of {{sources: ...}}, got {describe(value)}")
        return None
    found = StackParse([], [], [])
    if base is not None:
        _register(found, base, "base_model")
    ok = True
    for k, entry in enumerate(value):
        where = f"slices[{k}]"
        item = check.mapping(entry, where, "a mapping {sources: [...], parameters: ...}")
        if item is None:
            ok = False
            continue
        check.keys(
            item,
            where,
            ("sources", "parameters"),
            unsupported={
                "base_model": "not supported per slice; set base_model at the top level",
                "residual_weight": "not supported (mergekit ignores it too)",
            },
        )
        piece = _mk_slice(item, where, check, found, method, spec, base)
        if piece is None:
            ok = False
            continue
        sources, keys, own_params = piece
        params = None
        if "parameters" in item:
            params = check.mapping(item["parameters"], f"{where}.parameters")
        if method == "slerp":
            if params is not None:
                check.keys(params, f"{where}.parameters", ("t",))
            has_t = params is not None and "t" in params
            t = params.get("t") if params is not None else None
            schedule = slerp_schedule(t, has_t, where, top_t, has_top_t, check)
            if schedule is None:
                check.add(
                    f"{where}.parameters.t",
                    "missing; slerp needs t (here or in the top-level parameters)",
                )
            found.slices.append(Slice(tuple(sources), where, tuple(keys), schedule=schedule))
            continue
        base_first = _base_first(method, spec, base)
        model_params, shared = method_parameters(
            spec,
            params,
            own_params,
            where,
            keys,
            check,
            top_model or {},
            top_shared or {},
            base_first,
        )
        found.slices.append(
            Slice(
                tuple(sources),
                where,
                tuple(keys),
                model_params=model_params,
                shared_params=shared,
            )
        )
    if not ok:
        return None
    if method == "slerp" and len(found.models) == 1 and found.slices:
        # One model merged with other layers of itself: its two ends are the same model.
        found.models.append(found.models[0])
        found.keys.append(found.slices[0].keys[-1])
        found.slices = [
            dataclasses.replace(
                piece, sources=(piece.sources[0], dataclasses.replace(piece.sources[1], model=1))
            )
            for piece in found.slices
        ]
    if method == "slerp" and len(found.models) != 2 and base is not None:
        check.add(
            "slices",
            f"slerp merges exactly two models; base_model and the slices name "
            f"{len(found.models)} distinct ones",
        )
        return None
    return found


def _mk_slice(
    item: Mapping[Any, Any],
    where: str,
    check: Check,
    found: StackParse,
    method: str,
    spec: Any,
    base: ModelRef | None,
) -> tuple[list[SliceSource], list[str], list[Any]] | None:
    """The sources of one slice in the method's order (the base first), their keys and their
    own parameters blocks."""
    raw = item.get("sources")
    if "sources" not in item:
        check.add(f"{where}.sources", "missing; the models and their layer_range")
        return None
    if not isinstance(raw, list) or not raw:
        check.add(
            f"{where}.sources",
            f"expected a non-empty list of {{model, layer_range}}, got {describe(raw)}",
        )
        return None
    entries: list[tuple[SliceSource, str, Any, bool]] = []
    ok = True
    for i, entry in enumerate(raw):
        path = f"{where}.sources[{i}]"
        src = check.mapping(entry, path, "a mapping {model: ..., layer_range: [start, end]}")
        if src is None:
            ok = False
            continue
        check.keys(src, path, ("model", "layer_range", "parameters"))
        params = src.get("parameters")
        if params is not None and method == "slerp":
            mk_model_parameters(params, at(path, "parameters"), check)
        ref = None
        if "model" not in src:
            check.add(at(path, "model"), "missing; the model reference")
        else:
            ref = mk_ref(src["model"], at(path, "model"), check)
        span = None
        if "layer_range" not in src:
            check.add(at(path, "layer_range"), "missing; e.g. [0, 32] for all 32 layers")
        else:
            span = mk_layer_range(src["layer_range"], at(path, "layer_range"), check)
        if ref is None or span is None:
            ok = False
            continue
        model = _register(found, ref, at(path, "model"))
        is_base = base is not None and ref == base
        entries.append((SliceSource(model, span[0], span[1]), path, params, is_base))
    if not ok:
        return None
    if method == PASSTHROUGH and len(entries) > 1:
        check.add(
            f"{where}.sources",
            f"passthrough copies one source per slice, got {len(entries)}; merge them with "
            "another merge_method or give each its own slice",
        )
        return None
    if method == "slerp" and len(entries) != 2:
        check.add(f"{where}.sources", f"slerp needs exactly two sources, got {len(entries)}")
        return None
    lengths = {e[0].num_layers for e in entries}
    if len(lengths) > 1:
        spans = ", ".join(f"[{e[0].start}, {e[0].end}]" for e in entries)
        check.add(
            f"{where}.sources",
            f"the layer ranges have different lengths ({spans}); {method} merges layer i of "
            "each source with layer i of the others",
        )
        return None
    if _base_first(method, spec, base):
        bases = [e for e in entries if e[3]]
        if not bases:
            check.add(
                f"{where}.sources",
                f"base_model must be one of the sources ({method} takes it from each slice)",
            )
            return None
        entries = bases[:1] + [e for e in entries if e is not bases[0]]
    return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]


def _base_first(method: str, spec: Any, base: ModelRef | None) -> bool:
    """Whether each slice's base_model source comes first and takes no parameters: slerp, a
    method that needs a base, and one that uses a base when given (nuslerp, multislerp: mergekit
    takes the slice's base_model source as the base, and weights only the others)."""
    if method == "slerp":
        return True
    if spec is None:
        return False
    return bool(spec.base == "required" or (spec.base == "optional" and base is not None))


def slerp_schedule(
    slice_t: Any, has_slice_t: bool, where: str, top_t: Any, has_top_t: bool, check: Check
) -> Schedule | None:
    """SLERP's t in one slice: the slice's, falling back on the top level's (a condition list
    without a fallback hands unmatched tensors on, as in mergekit)."""
    rules: list[Rule] = []
    default: TValue | None = None
    if has_slice_t:
        rules, default = mk_t(slice_t, f"{where}.parameters.t", check)
    if has_top_t and default is None:
        top_rules, top_default = mk_t(top_t, "parameters.t", check)
        rules += top_rules
        default = top_default
    if not has_slice_t and not has_top_t:
        return None
    return Schedule(rules=tuple(rules), default=default, non_layer=None, style="mergekit")


def method_parameters(
    spec: Any,
    slice_params: Any,
    source_params: Sequence[Any],
    where: str,
    keys: Sequence[str],
    check: Check,
    top_model: Mapping[str, Schedule],
    top_shared: Mapping[str, Schedule | bool],
    skip_first: bool,
) -> tuple[tuple[Mapping[str, Schedule], ...], Mapping[str, Schedule | bool]]:
    """Per source (the base left out when ``skip_first``) and shared parameters of one slice."""
    slice_model, slice_shared = mk_method_params(
        slice_params if slice_params is not None else {},
        f"{where}.parameters",
        spec,
        check,
        top=True,
    )
    fallback = with_fallback(slice_model, dict(top_model))
    shared = {**top_shared, **slice_shared}
    per_source: list[Mapping[str, Schedule]] = []
    for i, (params, key) in enumerate(zip(source_params, keys, strict=True)):
        own, _ = mk_method_params(
            params if params is not None else {}, f"{key}.parameters", spec, check, top=False
        )
        if skip_first and i == 0:
            continue
        per_source.append(with_fallback(own, fallback))
    return tuple(per_source), shared


# Reads the parameters inside one ``layers:`` entry (supplied by :mod:`~.ours`, which knows
# the method): (raw mapping, its path, per-model names only?) -> (per-model, shared) values.
EntryParams = Callable[
    [Mapping[Any, Any], str, bool], tuple[dict[str, Schedule], dict[str, Schedule | bool]]
]
ENTRY_PARAMETERS = "parameters"  # the key of an entry's own parameters in ``layers:``


def our_layers(
    value: Any,
    check: Check,
    model_keys: Sequence[str],
    method: str,
    base_first: bool,
    model_params: Sequence[Mapping[str, Schedule]] | None = None,
    shared_params: Mapping[str, Schedule | bool] | None = None,
    read_params: EntryParams | None = None,
) -> list[Slice] | None:
    """Our format's ``layers:``: a list of slices, each mapping model keys to an inclusive
    layer range ("0-23"); the models are the recipe's, named by their keys.

    An entry may carry its own parameters (``read_params`` parses them): under
    ``parameters:`` for the entry (SLERP's ``t``, a method's shared ones, and per-model ones
    for every model of the entry), and per model as ``key: {layers: "0-23", weight: 0.3}``.
    The most specific wins: the model's in the entry, the entry's, the model's in ``models:``,
    then the recipe's ``parameters:``. Gradients run along the entry's own depth.
    """
    if not isinstance(value, list) or not value:
        check.add(
            "layers",
            f'expected a list such as [{{a: "0-23"}}, {{b: "8-31"}}], got {describe(value)}',
        )
        return None
    if ENTRY_PARAMETERS in model_keys:
        check.add(
            "layers",
            f"a model named {ENTRY_PARAMETERS!r} cannot be used here: in layers: that key holds "
            "an entry's parameters; rename the model",
        )
        return None
    slices: list[Slice] = []
    for k, entry in enumerate(value):
        where = f"layers[{k}]"
        item = check.mapping(entry, where, 'a mapping of model keys to layer ranges ("0-23")')
        if item is None:
            continue
        entry_model: dict[str, Schedule] = {}
        entry_shared: dict[str, Schedule | bool] = {}
        ok = True
        if ENTRY_PARAMETERS in item:
            path = f"{where}.{ENTRY_PARAMETERS}"
            raw_params = check.mapping(item[ENTRY_PARAMETERS], path)
            if raw_params is None or read_params is None:
                if read_params is None:
                    check.add(path, f"{method} takes no parameters")
                ok = False
            else:
                entry_model, entry_shared = read_params(raw_params, path, False)
        sources: list[tuple[int, SliceSource, str, dict[str, Schedule]]] = []
        for key, raw in item.items():
            if key == ENTRY_PARAMETERS:
                continue
            path = f"{where}.{key}"
            if key not in model_keys:
                known = ", ".join(model_keys)
                check.add(path, f"not a model of this recipe; expected one of {known}")
                ok = False
                continue
            own: dict[str, Schedule] = {}
            if isinstance(raw, dict):
                if read_params is None or method == "slerp":
                    hint = f" (slerp's t goes under {where}.{ENTRY_PARAMETERS})"
                    check.add(
                        path,
                        f'expected a layer range such as "0-23"; {method} takes no per-model '
                        f"parameters{hint if method == 'slerp' else ''}",
                    )
                    ok = False
                    continue
                if "layers" not in raw:
                    check.add(f"{path}.layers", 'missing; the model\'s layers, e.g. "0-23"')
                    ok = False
                    continue
                own, _ = read_params({p: v for p, v in raw.items() if p != "layers"}, path, True)
                raw = raw["layers"]
            span = parse_span(raw)
            if isinstance(span, str):
                check.add(path, span)
                ok = False
                continue
            model = list(model_keys).index(key)
            sources.append((model, SliceSource(model, span[0], span[1]), path, own))
        if not ok:
            continue
        if not sources:
            check.add(where, "empty; name at least one model and its layers")
            continue
        if method == PASSTHROUGH and len(sources) > 1:
            check.add(where, f"passthrough copies one model per entry, got {len(sources)}")
            continue
        if method == "slerp" and len(sources) != 2:
            check.add(where, "slerp merges two models: give the layers of both a and b")
            continue
        lengths = {s.num_layers for _, s, _, _ in sources}
        if len(lengths) > 1:
            spans = ", ".join(f"{p.rsplit('.', 1)[1]}: {s.num_layers}" for _, s, p, _ in sources)
            check.add(where, f"the layer ranges have different lengths ({spans} layers)")
            continue
        if base_first and all(m != 0 for m, _, _, _ in sources):
            check.add(where, f"{model_keys[0]} must be one of the models of every entry")
            continue
        sources.sort(key=lambda e: e[0] != 0 if base_first else 0)
        params = None
        if model_params is not None:
            # Every model's parameters as the recipe gives them (the base has none), then the
            # entry's, then the model's own in the entry.
            first = 1 if base_first and method != "slerp" else 0
            params = tuple(
                {**model_params[m - first], **entry_model, **own}
                for m, _, _, own in sources[first:]
            )
        shared = {**shared_params, **entry_shared} if shared_params is not None else None
        slices.append(
            Slice(
                tuple(s for _, s, _, _ in sources),
                where,
                tuple(p for _, _, p, _ in sources),
                schedule=entry_model.get("t") if method == "slerp" else None,
                model_params=params,
                shared_params=shared,
            )
        )
    return slices if len(slices) == len(value) else None
