"""shardmerge's own recipe format (see :mod:`shardmerge.recipe` for a worked example).

Two models and a ``t`` schedule for SLERP, or ``method:`` with a ``base:`` and any number of
models for every other method; each parameter scheduled per layer like ``t`` (a number, a
gradient, a ``layers`` map, ``match``/``regex`` rules), and ``layers:`` for a new stack.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

from shardmerge.methods import METHODS, unknown_method_message
from shardmerge.recipe.checks import (
    MERGEKIT_HINT,
    NO_SCHEDULE,
    Check,
    at,
    check_param_range,
    describe,
    is_device,
    is_repo_id,
    model_count_problem,
    model_index,
    parse_shard_size,
    placeholder,
    split_revision,
)
from shardmerge.recipe.model import DEFAULT_SHARD_SIZE_BYTES, PLACEHOLDER, ModelRef, Recipe
from shardmerge.recipe.stack import our_layers
from shardmerge.schedule import Gradient, LayerMap, Rule, Schedule, TValue
from shardmerge.slices import Slice
from shardmerge.vocab import VocabSpec

# A guard against typos such as "0-1000000000" expanding into a huge layer map.
_MAX_LAYER_INDEX = 100_000


# --------------------------------------------------------------------------- our format

_TOP_KEYS = ("method", "models", "t", "layers", "output", "device", "tokenizer_from", "hub")
# Our format with a method other than slerp (models with parameters, a base, shared parameters).
_METHOD_TOP_KEYS = (
    "method", "base", "models", "parameters", "layers", "random_seed", "output", "device", "hub",
    "tokenizer_from",
)  # fmt: skip


def parse_ours(data: dict[Any, Any], check: Check, text: str, source: str) -> Recipe:
    method = data.get("method", "slerp")
    if method != "slerp":
        return _parse_ours_method(data, check, text, source, method)
    check.keys(data, "", _TOP_KEYS, hint=MERGEKIT_HINT)
    model_a, model_b = _our_models(data, check)
    schedule = _our_schedule(data, check)

    output_dir: str | None = None
    name: str | None = None
    out_dtype: str | None = None
    shard_size = DEFAULT_SHARD_SIZE_BYTES
    output = check.mapping(data["output"], "output") if "output" in data else None
    if output is not None:
        check.keys(output, "output", ("dir", "name", "dtype", "shard_size"))
        if "dir" in output:
            output_dir = check.string(output["dir"], "output.dir", "a folder path")
        if "name" in output:
            name = check.string(output["name"], "output.name", "a model name")
        if "dtype" in output:
            out_dtype = check.dtype(output["dtype"], "output.dtype")
        if "shard_size" in output:
            shard_size = parse_shard_size(output["shard_size"], "output.shard_size", check)

    device = "auto"
    if "device" in data:
        value = data["device"]
        if is_device(value):
            device = value
        else:
            check.add("device", f"expected auto, cpu, cuda or cuda:N, got {describe(value)}")

    tokenizer: Literal["a", "b"] = "a"
    vocab: VocabSpec | None = None
    if "tokenizer_from" in data:
        value = data["tokenizer_from"]
        if value in ("a", "b"):
            tokenizer = "b" if value == "b" else "a"
            vocab = VocabSpec(source=1 if value == "b" else 0)
        elif value == "union":
            vocab = VocabSpec(source="union")
        else:
            check.add("tokenizer_from", f"expected a, b or union, got {describe(value)}")

    push_to: str | None = None
    private = False
    stream = False
    hub = check.mapping(data["hub"], "hub") if "hub" in data else None
    if hub is not None:
        check.keys(hub, "hub", ("push_to", "private", "stream"))
        if "push_to" in hub:
            value = hub["push_to"]
            if is_repo_id(value):
                push_to = value
            else:
                check.add(
                    "hub.push_to", f"expected a Hub repo id 'org/name', got {describe(value)}"
                )
        if "private" in hub:
            private = bool(check.boolean(hub["private"], "hub.private"))
            if "push_to" not in hub:
                check.warnings.append("hub.private has no effect without hub.push_to")
        if "stream" in hub:
            stream = bool(check.boolean(hub["stream"], "hub.stream"))

    slices: tuple[Slice, ...] = ()
    if "layers" in data:

        def slerp_entry(
            raw: Mapping[Any, Any], path: str, per_model: bool
        ) -> tuple[dict[str, Schedule], dict[str, Schedule | bool]]:
            check.keys(raw, path, ("t",))
            t = _our_scheduled(raw["t"], f"{path}.t", check) if "t" in raw else None
            return ({"t": t} if t is not None else {}), {}

        found = our_layers(
            data["layers"], check, ("a", "b"), "slerp", True, read_params=slerp_entry
        )
        slices = tuple(found or ())
    elif model_a == model_b and model_a != PLACEHOLDER:
        shown = model_a.ref + (f"@{model_a.revision}" if model_a.revision else "")
        check.warnings.append(
            f"models.a and models.b are the same model ({shown}); the merge reproduces it"
        )

    return Recipe(
        models=(model_a, model_b),
        schedule=schedule,
        input_dtype=None,
        out_dtype=out_dtype,
        output_dir=output_dir,
        shard_size_bytes=shard_size,
        device=device,
        tokenizer_source=tokenizer,
        vocab=vocab,
        layer_range=None,
        push_to_hub=push_to,
        private=private,
        stream=stream,
        format="shardmerge",
        text=text,
        source=source,
        warnings=tuple(check.warnings),
        name=name,
        slices=slices,
    )


def _our_models(data: dict[Any, Any], check: Check) -> tuple[ModelRef, ModelRef]:
    if "models" not in data:
        check.add("models", "missing; give models.a (the t = 0 end) and models.b (the t = 1 end)")
        return PLACEHOLDER, PLACEHOLDER
    models = check.mapping(data["models"], "models", "a mapping with keys a and b")
    if models is None:
        return PLACEHOLDER, PLACEHOLDER
    check.keys(models, "models", ("a", "b"))
    refs = []
    for key, end in (("a", "t = 0"), ("b", "t = 1")):
        path = f"models.{key}"
        if key not in models:
            check.add(path, f"missing; the model at the {end} end")
            refs.append(PLACEHOLDER)
        else:
            refs.append(_our_model(models[key], path, check) or PLACEHOLDER)
    return refs[0], refs[1]


def _our_model(value: Any, path: str, check: Check) -> ModelRef | None:
    """A model given as "ref", "ref@revision" or {path: ..., revision: ..., name: ...}."""
    if isinstance(value, dict):
        check.keys(value, path, ("path", "revision", "name"))
        name = check.string(value["name"], at(path, "name")) if "name" in value else None
        if "path" not in value:
            check.add(at(path, "path"), "missing; a Hub id (org/name) or a local folder")
            return None
        ref = check.string(value["path"], at(path, "path"), "a Hub id or a local folder")
        revision = None
        if "revision" in value:
            revision = check.string(
                value["revision"],
                at(path, "revision"),
                "a string (quote revisions that look like numbers)",
            )
            if revision is None:
                return None
        return ModelRef(ref, revision, name) if ref is not None else None
    if isinstance(value, str) and value.strip():
        return split_revision(value, path, check)
    check.add(
        path,
        "expected a Hub id or local path ('ref' or 'ref@revision') or {path: ..., revision: ...}, "
        f"got {describe(value)}",
    )
    return None


def _our_schedule(data: dict[Any, Any], check: Check) -> Schedule:
    fallback = Schedule(rules=(), default=0.5, non_layer=0.5, style="shardmerge")
    if "t" not in data:
        check.add("t", "missing; e.g. `t: 0.5`, or a mapping with default, non_layer and rules")
        return fallback
    return _our_scheduled(data["t"], "t", check) or fallback


def _our_scheduled(raw: Any, path: str, check: Check, bounded: bool = True) -> Schedule | None:
    """A scheduled value (t, or any method parameter): a number, or a mapping with default,
    non_layer and rules; ``bounded``: every number in [0, 1]."""
    if isinstance(raw, list):
        check.add(
            path,
            f"a bare list is not a {path} here; for a gradient write "
            f"`{path}: {{default: {{gradient: [...]}}, non_layer: ...}}`",
        )
        return None
    if not isinstance(raw, dict):
        value = check.t(raw, path, bounded)
        return Schedule(rules=(), default=value, non_layer=value, style="shardmerge")

    check.keys(raw, path, ("default", "non_layer", "rules"))
    default: TValue | None = None
    if "default" in raw:
        default = _our_value(raw["default"], f"{path}.default", check, bounded)
    non_layer = (
        check.t(raw["non_layer"], f"{path}.non_layer", bounded) if "non_layer" in raw else None
    )

    rules: list[Rule] = []
    needs_non_layer: list[str] = []  # why tensors outside the stacks need an explicit t
    if "rules" in raw:
        items = raw["rules"]
        if not isinstance(items, list):
            check.add(f"{path}.rules", f"expected a list of rules, got {describe(items)}")
            items = []
        for i, item in enumerate(items):
            rule = _our_rule(item, f"{path}.rules[{i}]", check, bounded)
            if rule is None:
                continue
            rules.append(rule)
            if not isinstance(rule.value, float):
                kind = "gradient" if isinstance(rule.value, Gradient) else "layers"
                needs_non_layer.append(f"{path}.rules[{i}] uses {kind}")

    if "default" not in raw and "rules" not in raw:
        check.add(path, "give a default, rules, or both")
    if "default" not in raw:
        needs_non_layer.insert(0, "there is no default")
    elif isinstance(default, Gradient):
        needs_non_layer.insert(0, "the default is a gradient")
    if "non_layer" not in raw:
        if needs_non_layer:
            check.add(
                f"{path}.non_layer",
                f"missing; it is required because {needs_non_layer[0]}: tensors outside the "
                "layer stacks (embeddings, final norm, lm_head) have no layer position, so give "
                "them an explicit value (mergekit would silently use a gradient's first anchor)",
            )
        elif isinstance(default, float):
            non_layer = default
    return Schedule(rules=tuple(rules), default=default, non_layer=non_layer, style="shardmerge")


def _our_value(
    value: Any, path: str, check: Check, bounded: bool = True
) -> float | Gradient | None:
    """A number or {gradient: [...]}."""
    if isinstance(value, dict):
        check.keys(value, path, ("gradient",))
        if "gradient" not in value:
            check.add(path, "expected a number or {gradient: [...]}")
            return None
        return check.gradient(value["gradient"], at(path, "gradient"), bounded)
    if isinstance(value, list):
        check.add(path, "a bare list is not a t here; write {gradient: [...]}")
        return None
    return check.t(value, path, bounded)


def _our_rule(item: Any, path: str, check: Check, bounded: bool = True) -> Rule | None:
    rule = check.mapping(
        item, path, "a rule mapping (match or regex, and value, gradient or layers)"
    )
    if rule is None:
        return None
    check.keys(rule, path, ("match", "regex", "value", "gradient", "layers"))

    pattern: str | None = None
    kind: Literal["substring", "regex"] = "substring"
    patterns = [k for k in ("match", "regex") if k in rule]
    if not patterns:
        if not check.any_suggested(path, ("match", "regex")):
            check.add(path, "give `match:` (a substring of the tensor name) or `regex:`")
    elif len(patterns) == 2:
        check.add(path, "give only one of match and regex")
    elif patterns[0] == "match":
        pattern = check.string(rule["match"], at(path, "match"), "a substring of tensor names")
    else:
        kind = "regex"
        pattern = check.string(rule["regex"], at(path, "regex"), "a regular expression")
        if pattern is not None:
            try:
                re.compile(pattern)
            # OverflowError: a{99999999999}; RecursionError: parentheses nested thousands deep.
            except (re.error, OverflowError, RecursionError) as exc:
                reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
                check.add(at(path, "regex"), f"invalid regular expression: {reason}")
                pattern = None

    value: TValue | None = None
    values = [k for k in ("value", "gradient", "layers") if k in rule]
    if not values:
        if not check.any_suggested(path, ("value", "gradient", "layers")):
            check.add(path, "give one of value (a number), gradient (a list) or layers (a mapping)")
    elif len(values) > 1:
        check.add(path, f"give only one of value, gradient and layers (got {' and '.join(values)})")
    elif values[0] == "value":
        value = check.t(rule["value"], at(path, "value"), bounded)
    elif values[0] == "gradient":
        value = check.gradient(rule["gradient"], at(path, "gradient"), bounded)
    else:
        value = _layer_map(rule["layers"], at(path, "layers"), check, bounded)

    if pattern is None or value is None:
        return None
    label = pattern if kind == "substring" else f"re:{pattern}"
    return Rule(pattern=pattern, kind=kind, value=value, label=label, where=path)


# Bounded digits: int() refuses strings of thousands of digits (and no model has 10**12 layers).
_RANGE_RE = re.compile(r"([0-9]{1,12})(?:\s*-\s*([0-9]{1,12}))?")


def _layer_map(value: Any, path: str, check: Check, bounded: bool = True) -> LayerMap | None:
    """{index: t, "a-b": t} (inclusive ranges) -> LayerMap; overlapping keys are errors."""
    mapping = check.mapping(value, path, "a mapping of layer indices or 'a-b' ranges to t")
    if mapping is None:
        return None
    if not mapping:
        check.add(path, "needs at least one layer")
        return None
    spans: list[tuple[int, int, str, float]] = []
    ok = True
    for key, raw_t in mapping.items():
        where = f"{path}.{key}"
        span = _layer_span(key)
        problem = None
        if span is None:
            problem = "a key must be a layer index (0, 1, ...) or an inclusive range 'a-b'"
        elif span[0] > span[1]:
            problem = f"the range is backwards; write '{span[1]}-{span[0]}'"
        elif span[1] > _MAX_LAYER_INDEX:
            problem = f"layer {span[1]} is implausibly large (limit {_MAX_LAYER_INDEX})"
        if problem is not None:
            check.add(where, problem)
            ok = False
        t = check.t(raw_t, where, bounded)
        ok = ok and t is not None
        if problem is None and span is not None:
            spans.append((span[0], span[1], str(key), t or 0.0))
    spans.sort()
    reach, reach_key = -1, ""  # the furthest layer covered so far, and by which key
    for start, end, key, _ in spans:
        if start <= reach:
            check.add(path, f"keys {reach_key!r} and {key!r} both give layer {start} a t")
            ok = False
        if end > reach:
            reach, reach_key = end, key
    if not ok:
        return None
    values = [(i, t) for start, end, _, t in spans for i in range(start, end + 1)]
    return LayerMap(tuple(values))


def _layer_span(key: Any) -> tuple[int, int] | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return (key, key) if key >= 0 else None
    if isinstance(key, str):
        match = _RANGE_RE.fullmatch(key.strip())
        if match:
            start = int(match.group(1))
            return start, int(match.group(2)) if match.group(2) else start
    return None


def _parse_ours_method(
    data: dict[Any, Any], check: Check, text: str, source: str, name: Any
) -> Recipe:
    """Our format for any method but slerp::

        method: ties
        base: ./base                      # the model task vectors are taken from
        models:                           # name -> "ref" or {path, revision, parameters...}
          chat: {path: ./chat, weight: 0.6, density: 0.5}
          code: {path: org/code@v2, weight: {default: 0.4, non_layer: 0.3}}
        parameters: {normalize: true, density: 0.7}   # shared ones, and per-model defaults
        random_seed: 1

    Every number may be scheduled per layer exactly like ``t``.
    """

    if not isinstance(name, str):
        check.add("method", f"expected a method name such as ties, got {describe(name)}")
        return placeholder(text, source, check)
    spec = METHODS.get(name)
    if spec is None:
        check.add("method", unknown_method_message(name))
        return placeholder(text, source, check)
    check.keys(data, "", _METHOD_TOP_KEYS, hint=MERGEKIT_HINT)
    per_model_names = [p.name for p in spec.per_model]

    def scheduled(raw: Any, path: str, param: Any) -> Schedule | bool | None:
        if param.kind == "bool":
            return check.boolean(raw, path)
        schedule = _our_scheduled(raw, path, check, bounded=False)
        if schedule is not None:
            check_param_range(param, schedule, path, check)
        return schedule

    def read_params(
        raw: Mapping[Any, Any], path: str, per_model_only: bool
    ) -> tuple[dict[str, Schedule], dict[str, Schedule | bool]]:
        """A parameters mapping -> (per-model, shared) values; ``per_model_only``: one model's
        own (in a ``layers:`` entry), where shared parameters have no place."""
        check.keys(raw, path, per_model_names if per_model_only else [p.name for p in spec.params])
        per_model: dict[str, Schedule] = {}
        shared: dict[str, Schedule | bool] = {}
        for key, value in raw.items():
            param = spec.param(str(key))
            if param is None or (per_model_only and not param.per_model):
                continue
            got = scheduled(value, f"{path}.{key}", param)
            if isinstance(got, Schedule) and param.per_model:
                per_model[param.name] = got
            elif got is not None:
                shared[param.name] = got
        return per_model, shared

    top_model: dict[str, Schedule] = {}
    shared: dict[str, Schedule | bool] = {}
    params = check.mapping(data["parameters"], "parameters") if "parameters" in data else None
    if params is not None:
        top_model, shared = read_params(params, "parameters", False)

    base: ModelRef | None = None
    if "base" in data:
        base = _our_model(data["base"], "base", check)
        if spec.base == "none":
            check.add("base", f"{name} takes no base model; list every model under models")
    elif spec.base == "required":
        check.add("base", f"missing; {name} needs a base (the model task vectors are taken from)")

    entries: list[tuple[str, Any]] = []
    raw_models = data.get("models")
    if raw_models is None:
        check.add("models", f"missing; the models {name} merges, each with its parameters")
    elif isinstance(raw_models, dict) and raw_models:
        entries = [(f"models.{key}", value) for key, value in raw_models.items()]
    elif isinstance(raw_models, list) and raw_models:
        entries = [(f"models[{i}]", value) for i, value in enumerate(raw_models)]
    else:
        check.add("models", f"expected a mapping or list of models, got {describe(raw_models)}")
    refs: list[ModelRef] = []
    keys: list[str] = []
    model_params: list[dict[str, Schedule]] = []
    for path, value in entries:
        own: dict[str, Schedule] = {}
        ref: ModelRef | None
        if isinstance(value, dict):
            check.keys(value, path, ("path", "revision", *per_model_names))
            location = {k: v for k, v in value.items() if k in ("path", "revision")}
            ref = _our_model(location, path, check)
            for key in per_model_names:
                if key in value:
                    param = spec.param(key)
                    got = scheduled(value[key], f"{path}.{key}", param)
                    if isinstance(got, Schedule):
                        own[key] = got
        else:
            ref = _our_model(value, path, check)
        merged = dict(top_model)
        merged.update(own)
        for param in spec.per_model:
            if param.default is None and param.name not in merged:
                check.add(
                    f"{path}.{param.name}",
                    f"missing; {name} needs a {param.name} for every model (here or in parameters)",
                )
        refs.append(ref or PLACEHOLDER)
        keys.append(path)
        model_params.append(merged)
    if entries:
        problem = model_count_problem(spec, len(entries), base is not None)
        if problem is not None:
            check.add("models", problem)
    uses_base = spec.base == "required" or (spec.base == "optional" and base is not None)
    if uses_base:
        refs.insert(0, base or PLACEHOLDER)
        keys.insert(0, "base")

    seed: int | None = None
    if "random_seed" in data:
        raw_seed = data["random_seed"]
        if isinstance(raw_seed, int) and not isinstance(raw_seed, bool) and raw_seed >= 0:
            seed = raw_seed
        else:
            check.add("random_seed", f"expected a non-negative integer, got {describe(raw_seed)}")
    slices: tuple[Slice, ...] = ()
    if "layers" in data:
        if isinstance(raw_models, list):
            check.add("layers", "name the models (models: as a mapping) to give their layers")
        else:
            names = tuple(key.split(".", 1)[1] for key in keys if key != "base")
            if uses_base:
                names = ("base", *names)
            found = our_layers(
                data["layers"], check, names, name, uses_base,
                model_params, shared, read_params if spec.params else None,
            )  # fmt: skip
            slices = tuple(found or ())
    elif name == "passthrough" and len(refs) > 1:
        check.add("models", "passthrough copies one model; give layers: to stack several")
    vocab: VocabSpec | None = None
    if "tokenizer_from" in data:
        # base, union, a model's name under models:, or its reference.
        value = data["tokenizer_from"]
        named = {key.removeprefix("models."): i for i, key in enumerate(keys)}
        if value == "union":
            vocab = VocabSpec("union")
        elif isinstance(value, str) and value in named:
            vocab = VocabSpec(named[value])
        else:
            known = all(r != PLACEHOLDER for r in refs)
            index = model_index(value, "tokenizer_from", tuple(refs), check, known)
            vocab = VocabSpec(index) if index is not None else None
    slerp_like = parse_ours(
        {"models": {"a": "x", "b": "y"}, "t": 0.5, **_common(data)}, check, text, source
    )
    return dataclasses.replace(
        slerp_like,
        vocab=vocab,
        models=tuple(refs),
        schedule=NO_SCHEDULE,
        warnings=tuple(check.warnings),
        method=name,
        model_keys=tuple(keys),
        model_params=tuple(model_params),
        shared_params=shared,
        random_seed=seed,
        slices=slices,
    )


def _common(data: dict[Any, Any]) -> dict[Any, Any]:
    """The keys our format reads the same way for every method (output, device, hub)."""
    return {k: data[k] for k in ("output", "device", "hub") if k in data}
