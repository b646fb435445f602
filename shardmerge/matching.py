"""Which tensors of several models' headers correspond: pure, no files, no torch.

Shared by :mod:`shardmerge.plan` (and :mod:`shardmerge.plan_stack`) and
:mod:`shardmerge.compare`: the tensors a model contributes (following the first model's
tie_word_embeddings), every mismatch between two models, and the cap on how many are listed.
"""

from __future__ import annotations

from collections.abc import Mapping

from shardmerge.inventory import ModelInventory, TensorInfo

LM_HEAD = "lm_head.weight"
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
# Problems listed in one error at most; the rest are counted.
MAX_LISTED = 20


def ties_embeddings(model: ModelInventory) -> bool:
    """Whether ``model`` ties lm_head to its embeddings (config, else lm_head's absence)."""
    config = model.config or {}
    value = config.get("tie_word_embeddings")
    if isinstance(value, bool):
        return value
    # No explicit setting: a checkpoint without lm_head ties it to the embeddings.
    return LM_HEAD not in model.tensors and embed_name(model.tensors) is not None


def embed_name(tensors: Mapping[str, TensorInfo]) -> str | None:
    """The input embedding's name, if any."""
    for name in tensors:
        if name.endswith(EMBED_SUFFIXES):
            return name
    return None


def tensor_sources(model: ModelInventory, tied: bool, warnings: list[str]) -> dict[str, TensorInfo]:
    """The tensors the output is made from, following the first model's tie_word_embeddings
    (``tied``); what was left out or borrowed is appended to ``warnings``."""
    sources = dict(model.tensors)
    embed = embed_name(sources)
    if tied and LM_HEAD in sources:
        del sources[LM_HEAD]
        warnings.append(
            f"{model.label} has a separate {LM_HEAD} but the first model ties it to the "
            "embeddings: following the first model, it is left out"
        )
    elif not tied and LM_HEAD not in sources and embed is not None:
        sources[LM_HEAD] = sources[embed]
        warnings.append(f"{model.label} ties {LM_HEAD} to {embed}: using {embed} as its {LM_HEAD}")
    return sources


def mismatches(
    label_a: str, a: Mapping[str, TensorInfo], label_b: str, b: Mapping[str, TensorInfo]
) -> list[str]:
    """Every difference between two models' tensors (names, shapes, float vs integer)."""
    problems = [f"tensor {n!r} is in {label_a} but not in {label_b}" for n in a if n not in b]
    problems += [f"tensor {n!r} is in {label_b} but not in {label_a}" for n in b if n not in a]
    for name, ta in a.items():
        tb = b.get(name)
        if tb is None:
            continue
        if ta.shape != tb.shape:
            hint = ""
            if name == LM_HEAD or name.endswith(EMBED_SUFFIXES):
                hint = (
                    " (the vocabularies differ; shardmerge does not silently truncate: add "
                    "tokenizer_source: union to the recipe (tokenizer_from: union in "
                    "shardmerge's format), or base or a model's reference for that tokenizer)"
                )
            problems.append(
                f"tensor {name!r}: shape {list(ta.shape)} in {label_a} vs {list(tb.shape)} "
                f"in {label_b}{hint}"
            )
        elif ta.is_float != tb.is_float:
            problems.append(
                f"tensor {name!r}: {ta.dtype} in {label_a} vs {tb.dtype} in {label_b} "
                "(cannot merge a float tensor with an integer one)"
            )
    return problems


def cap_problems(problems: list[str]) -> list[str]:
    """The first MAX_LISTED problems and a count of the rest."""
    if len(problems) <= MAX_LISTED:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more problems"]
