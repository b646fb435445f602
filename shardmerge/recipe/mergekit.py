"""mergekit configs, read unchanged: ``merge_method``, ``models:`` or ``slices:``.

The rule: a config mergekit runs, shardmerge runs; one it refuses, shardmerge refuses.
Parameters mergekit accepts but ignores for a method get a warning naming them; features
shardmerge lacks (``modules``, LoRA references) are errors, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from shardmerge.methods import METHODS, MethodSpec, unknown_method_message
from shardmerge.recipe.checks import (
    Check,
    at,
    describe,
    mergekit_recipe,
    model_count_problem,
    model_index,
    placeholder,
    with_fallback,
)
from shardmerge.recipe.mergekit_values import mk_method_params, mk_model_parameters, mk_ref, mk_t
from shardmerge.recipe.model import PLACEHOLDER, ModelRef, Recipe
from shardmerge.recipe.stack import mk_slices
from shardmerge.schedule import Rule, Schedule, TValue
from shardmerge.slices import Slice
from shardmerge.vocab import TokenOverride, VocabSpec

# --------------------------------------------------------------------------- mergekit

_MK_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
_MK_UNSUPPORTED = {
    "modules": "multi-module (modules:) configs are not supported; use models: or one slices: "
    "entry",
}


def parse_mergekit(data: dict[Any, Any], check: Check, text: str, source: str) -> Recipe:
    check.keys(data, "", _MK_KEYS, unsupported=_MK_UNSUPPORTED)
    method = data["merge_method"]
    if not isinstance(method, str):
        check.add("merge_method", f"expected a method name such as slerp, got {describe(method)}")
    elif method != "slerp":
        return _parse_mergekit_method(data, check, text, source, method)

    base: ModelRef | None = None
    base_text = ""
    if "base_model" not in data:
        check.add("base_model", "missing; slerp needs a base_model (the t = 0 end)")
    else:
        base = mk_ref(data["base_model"], "base_model", check)
        base_text = data["base_model"] if base is not None else ""

    other: tuple[ModelRef, str] | None = None
    layer_range: tuple[int, int] | None = None
    slices: tuple[Slice, ...] = ()
    if "models" in data and "slices" in data:
        check.add("models", "give only one of models and slices")
    elif "models" in data:
        other = _mk_models(data["models"], base, base_text, check)
    elif "slices" not in data:
        check.add("models", "missing; give models: (a list of {model: ...}) or slices:")

    # mergekit looks t up in the slice's parameters first, then the top level; a condition
    # list without a fallback hands unmatched tensors on to the next level.
    rules: list[Rule] = []
    default: TValue | None = None
    top_t = _mk_parameters(data, check)
    if "slices" in data and "models" not in data:
        has_top_t = top_t is not None
        found = mk_slices(
            data["slices"], check, method="slerp", spec=None, base=base,
            top_t=top_t, has_top_t=has_top_t,
        )  # fmt: skip
        if found is not None and base is not None:
            other = (found.models[1], str(data["slices"]))
            slices = tuple(found.slices)
            first = slices[0]
            if len(slices) == 1 and first.schedule is not None:
                rules, default = list(first.schedule.rules), first.schedule.default
                ranges = {(s.start, s.end) for s in first.sources}
                layer_range = next(iter(ranges)) if len(ranges) == 1 else None
            elif has_top_t:
                rules, default = mk_t(top_t, "parameters.t", check)
    elif top_t is not None:
        rules, default = mk_t(top_t, "parameters.t", check)
    else:
        check.add("parameters.t", "missing; slerp needs t (e.g. parameters: {t: 0.5})")

    input_dtype = check.dtype(data["dtype"], "dtype") if "dtype" in data else None
    out_dtype = check.dtype(data["out_dtype"], "out_dtype") if "out_dtype" in data else None
    tokenizer, vocab = _mk_tokenizer(data, base, base_text, other, check)

    return mergekit_recipe(
        check,
        text,
        source,
        models=(base or PLACEHOLDER, other[0] if other is not None else PLACEHOLDER),
        schedule=Schedule(rules=tuple(rules), default=default, non_layer=None, style="mergekit"),
        input_dtype=input_dtype,
        out_dtype=out_dtype,
        tokenizer_source=tokenizer,
        vocab=vocab,
        layer_range=layer_range,
        slices=slices,
    )


def _mk_models(
    value: Any, base: ModelRef | None, base_text: str, check: Check
) -> tuple[ModelRef, str] | None:
    """The non-base model of `models:`; the base is added when not listed, as mergekit does."""
    if not isinstance(value, list) or not value:
        check.add("models", f"expected a non-empty list of {{model: ...}}, got {describe(value)}")
        return None
    listed: list[tuple[ModelRef, str]] = []
    ok = True
    for i, entry in enumerate(value):
        path = f"models[{i}]"
        item = check.mapping(entry, path, "a mapping {model: ...}")
        if item is None:
            ok = False
            continue
        check.keys(item, path, ("model", "parameters"))
        if "parameters" in item:
            mk_model_parameters(item["parameters"], at(path, "parameters"), check)
        if "model" not in item:
            check.add(at(path, "model"), "missing; the model reference")
            ok = False
            continue
        ref = mk_ref(item["model"], at(path, "model"), check)
        if ref is None:
            ok = False
        else:
            listed.append((ref, item["model"]))
    if not ok or base is None:
        return None
    return _the_other(base, base_text, listed, "models", check)


def _the_other(
    base: ModelRef, base_text: str, listed: list[tuple[ModelRef, str]], path: str, check: Check
) -> tuple[ModelRef, str] | None:
    """The one model besides the base; slerp takes exactly two."""
    distinct: list[tuple[ModelRef, str]] = [(base, base_text)]
    for ref, text in listed:
        if all(ref != seen for seen, _ in distinct):
            distinct.append((ref, text))
    if len(distinct) != 2:
        names = ", ".join(text for _, text in distinct)
        check.add(
            path,
            f"slerp merges exactly two models; base_model and {path} name {len(distinct)} "
            f"distinct ones ({names})",
        )
        return None
    return distinct[1]


def _mk_parameters(data: dict[Any, Any], check: Check) -> Any:
    """The top-level parameters.t, or None when absent (checked for type and keys)."""
    if "parameters" not in data:
        return None
    params = check.mapping(data["parameters"], "parameters")
    if params is None:
        return None
    check.keys(params, "parameters", ("t",))
    return params.get("t")


def _mk_tokenizer(
    data: dict[Any, Any],
    base: ModelRef | None,
    base_text: str,
    other: tuple[ModelRef, str] | None,
    check: Check,
) -> tuple[Literal["a", "b"], VocabSpec | None]:
    """SLERP's tokenizer choices: ("a" or "b" for the files copied, the vocabulary spec)."""
    refs = (base or PLACEHOLDER, other[0] if other is not None else PLACEHOLDER)
    spec = _mk_vocab(data, refs, check, known=base is not None and other is not None)
    return ("b" if spec is not None and spec.source == 1 else "a"), spec


def _mk_vocab(
    data: dict[Any, Any], refs: tuple[ModelRef, ...], check: Check, known: bool = True
) -> VocabSpec | None:
    """tokenizer_source, or mergekit's `tokenizer:` block, and chat_template -> a VocabSpec
    (None: neither given; the base's, or first model's, tokenizer, vocabularies must match).
    ``known``: every model reference parsed (else unknown names are not reported)."""
    if "tokenizer_source" in data and "tokenizer" in data:
        check.add("tokenizer", "give only one of tokenizer_source and tokenizer")
        return None
    template = None
    if "chat_template" in data:
        template = _mk_chat_template(data["chat_template"], check)
    if "tokenizer_source" in data:
        source = _mk_vocab_source(data["tokenizer_source"], "tokenizer_source", refs, check, known)
        return VocabSpec(source=source, chat_template=template)
    if "tokenizer" not in data:
        return VocabSpec(source=0, chat_template=template) if template is not None else None
    block = check.mapping(data["tokenizer"], "tokenizer")
    if block is None:
        return None
    check.keys(block, "tokenizer", ("source", "tokens", "pad_to_multiple_of"))
    # mergekit's default source in the block is union.
    source = _mk_vocab_source(block.get("source", "union"), "tokenizer.source", refs, check, known)
    pad = None
    if "pad_to_multiple_of" in block:
        value = block["pad_to_multiple_of"]
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20:
            pad = value
        else:
            check.add(
                "tokenizer.pad_to_multiple_of",
                f"expected a positive whole number, got {describe(value)}",
            )
    overrides: list[TokenOverride] = []
    tokens = check.mapping(block["tokens"], "tokenizer.tokens") if "tokens" in block else None
    for token, entry in (tokens or {}).items():
        where = f"tokenizer.tokens[{token!r}]"
        item = check.mapping(entry, where, "a mapping {source: ..., force: ...}")
        if item is None:
            continue
        if not isinstance(token, str) or not token:
            check.add(where, "a token must be a non-empty string")
            continue
        check.keys(item, where, ("source", "force"))
        force = bool(check.boolean(item["force"], f"{where}.force")) if "force" in item else False
        raw = item.get("source")
        model: int | None = None
        source_token: str | None = None
        source_id: int | None = None
        if isinstance(raw, dict):
            kind = raw.get("kind")
            check.keys(raw, f"{where}.source", ("kind", "model", "token", "token_id"))
            if kind == "zero":
                overrides.append(TokenOverride(token, None, force=force, where=where))
                continue
            if kind != "model_token":
                check.add(
                    f"{where}.source.kind", f"expected zero or model_token, got {describe(kind)}"
                )
                continue
            if ("token" in raw) == ("token_id" in raw):
                check.add(f"{where}.source", "give exactly one of token and token_id")
                continue
            if "token" in raw:
                source_token = check.string(raw["token"], f"{where}.source.token")
            elif isinstance(raw["token_id"], int) and raw["token_id"] >= 0:
                source_id = raw["token_id"]
            else:
                check.add(
                    f"{where}.source.token_id",
                    f"expected a token id, got {describe(raw['token_id'])}",
                )
                continue
            raw = raw.get("model")
        found = model_index(raw, f"{where}.source", refs, check, known)
        if found is None:
            continue
        model = found
        overrides.append(TokenOverride(token, model, source_token, source_id, force, where))
    return VocabSpec(source, tuple(overrides), pad, template)


def _mk_vocab_source(
    value: Any, path: str, refs: tuple[ModelRef, ...], check: Check, known: bool
) -> Literal["union"] | int:
    if value == "union":
        return "union"
    if value == "base":
        return 0
    return model_index(value, path, refs, check, known) or 0


_CHAT_TEMPLATE_NAMES = ("chatml", "auto")


def _mk_chat_template(value: Any, check: Check) -> str | None:
    """A built-in name (chatml), auto (the inputs' most common) or a Jinja string."""
    if isinstance(value, str) and (
        value in _CHAT_TEMPLATE_NAMES or ("{" in value and len(value) >= 20)
    ):
        return value
    hint = ""
    if value in ("alpaca", "llama3", "mistral", "exaone"):
        hint = f" (mergekit's built-in {value} template is not shipped: paste it as a string)"
    check.add(
        "chat_template",
        f"expected chatml, auto or a Jinja template (at least 20 characters with a '{{'), got "
        f"{describe(value)}{hint}",
    )
    return None


def _parse_mergekit_method(
    data: dict[Any, Any], check: Check, text: str, source: str, name: str
) -> Recipe:
    """A mergekit config of a method other than slerp: base_model, models: with any number of
    entries and their parameters, top-level parameters (per-model ones there are every model's
    fallback, as in mergekit's lookup)."""

    spec: MethodSpec | None = METHODS.get(name)
    if spec is None:
        check.add("merge_method", unknown_method_message(name))
        return placeholder(text, source, check)
    base: ModelRef | None = None
    if "base_model" in data:
        base = mk_ref(data["base_model"], "base_model", check)
    elif spec.base == "required":
        check.add(
            "base_model",
            f"missing; {name} needs a base_model (the model task vectors are taken from)",
        )
    top_model, shared = mk_method_params(
        data.get("parameters", {}), "parameters", spec, check, top=True
    )
    merged: list[tuple[ModelRef, str, dict[str, Schedule]]] = []
    slices: tuple[Slice, ...] = ()
    if "slices" in data:
        if "models" in data:
            check.add("models", "give only one of models and slices")
        found = _method_slices(data, check, name, spec, base, top_model, shared)
        if found is not None:
            slices, merged = found
    elif "models" not in data:
        check.add("models", "missing; give models: (a list of {model: ..., parameters: ...})")
    elif not isinstance(data["models"], list) or not data["models"]:
        check.add(
            "models",
            f"expected a non-empty list of {{model: ...}}, got {describe(data['models'])}",
        )
    else:
        for i, entry in enumerate(data["models"]):
            path = f"models[{i}]"
            item = check.mapping(entry, path, "a mapping {model: ..., parameters: ...}")
            if item is None:
                continue
            check.keys(item, path, ("model", "parameters"))
            if "model" not in item:
                check.add(at(path, "model"), "missing; the model reference")
                continue
            ref = mk_ref(item["model"], at(path, "model"), check)
            own, _ = mk_method_params(
                item.get("parameters", {}), at(path, "parameters"), spec, check, top=False
            )
            if ref is None:
                continue
            if spec.base != "none" and ref == base:
                if own:
                    check.warnings.append(
                        f"{path}.parameters: ignored; the base_model takes no parameters in {name}"
                    )
                continue
            if any(ref == seen for seen, _, _ in merged):
                check.add(at(path, "model"), f"{item['model']!r} is listed twice")
                continue
            merged.append((ref, path, own))
    if (
        not slices
        and base is not None
        and spec.base == "none"
        and all(ref != base for ref, _, _ in merged)
    ):
        merged.append((base, "base_model", {}))  # mergekit appends an unlisted base as a model
    if "models" in data:
        problem = model_count_problem(spec, len(merged), base is not None)
        if problem is not None:
            check.add("models", problem)
    if name == "passthrough" and not slices and len(merged) > 1:
        check.add("models", "passthrough copies one model; use slices: to stack layers of several")
    model_params = tuple(with_fallback(own, top_model) for _, _, own in merged)
    checked: list[tuple[tuple[ModelRef, str, Any], Mapping[str, Schedule]]] = list(
        zip(merged, model_params, strict=True)
    )
    if slices:  # the parameters live in each slice
        model_params = tuple({} for _ in merged)
        checked = [
            ((PLACEHOLDER, key, {}), params)
            for piece in slices
            for key, params in zip(
                piece.keys[len(piece.keys) - len(piece.model_params or ()) :],
                piece.model_params or (),
                strict=True,
            )
        ]
    for (_, path, _), params in checked:
        for param in spec.per_model:
            if param.default is None and param.name not in params:
                check.add(
                    f"{path}.parameters.{param.name}",
                    f"missing; {name} needs a {param.name} for every model (here or in the "
                    "top-level parameters)",
                )
    refs = tuple(ref for ref, _, _ in merged)
    keys = tuple(path for _, path, _ in merged)
    if spec.base == "required" or (spec.base == "optional" and base is not None):
        refs = (base or PLACEHOLDER, *refs)
        keys = ("base_model", *keys)
    vocab = _mk_vocab(data, refs, check, known=all(r != PLACEHOLDER for r in refs))
    input_dtype = check.dtype(data["dtype"], "dtype") if "dtype" in data else None
    out_dtype = check.dtype(data["out_dtype"], "out_dtype") if "out_dtype" in data else None
    return mergekit_recipe(
        check,
        text,
        source,
        models=refs,
        input_dtype=input_dtype,
        out_dtype=out_dtype,
        vocab=vocab,
        method=name,
        model_keys=keys,
        model_params=model_params,
        shared_params=shared,
        slices=slices,
    )


def _method_slices(
    data: dict[Any, Any],
    check: Check,
    name: str,
    spec: Any,
    base: ModelRef | None,
    top_model: dict[str, Schedule],
    shared: dict[str, Schedule | bool],
) -> tuple[tuple[Slice, ...], list[tuple[ModelRef, str, dict[str, Schedule]]]] | None:
    """A method's slices: and the models they name (besides a base the method uses, which the
    recipe puts first), each with no parameters of its own at the recipe level (they live in
    each slice)."""

    found = mk_slices(
        data["slices"], check, method=name, spec=spec, base=base,
        top_model=top_model, top_shared=shared,
    )  # fmt: skip
    if found is None:
        return None
    named = list(zip(found.models, found.keys, strict=True))
    if spec.base != "none" and base is not None:
        named = named[1:]
    return tuple(found.slices), [(ref, key, {}) for ref, key in named]
