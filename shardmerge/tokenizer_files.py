"""Tokenizer files in and out: the inputs' vocabularies for :mod:`shardmerge.vocab`, and the
output's tokenizer files, config ids and chat template.

Only merges that choose a tokenizer (tokenizer_source, tokenizer:, chat_template) come here, and
only those whose vocabularies need reading import the ``tokenizers`` library (the ``vocab``
extra), to read and to write tokenizer.json.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardmerge.errors import InputError
from shardmerge.inventory import ModelInventory
from shardmerge.matching import EMBED_SUFFIXES
from shardmerge.vocab import AddedToken, TokenizerVocab, VocabPlan, plan_vocab

if TYPE_CHECKING:
    from shardmerge.recipe import Recipe
    from shardmerge.resolve import ResolvedModel

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# What reading a vocabulary needs from a Hub model (downloaded before any weights).
VOCAB_FILES = (
    TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", *TEMPLATE_FILES,
    "tokenizer.model", "vocab.json",
)  # fmt: skip

# ChatML, written out (mergekit's built-in names other than chatml: paste the template).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def model_rows(inventory: ModelInventory) -> int | None:
    """A model's embedding rows: config.json's vocab_size (or text_config's), else the rows of
    its input embedding."""
    config = inventory.config or {}
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            value = holder.get("vocab_size")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    for name, info in inventory.tensors.items():
        if name.endswith(EMBED_SUFFIXES) and info.shape:
            return info.shape[0]
    return None


def prepare_vocab(recipe: Recipe, models: Sequence[ResolvedModel]) -> VocabPlan | None:
    """The output vocabulary the recipe asks for, from the inputs' tokenizer files; None when
    it needs no re-indexing (no tokenizer choice, or one model's tokenizer over models that all
    have its embedding size).

    Raises:
        InputError: a tokenizer that cannot be read or unioned, an unknown override token, or
            the vocabularies differ and the recipe does not say which tokenizer to use.
    """
    spec = recipe.vocab
    rows = [model_rows(m.inventory) for m in models]
    same = len(set(rows)) == 1
    if spec is None or (
        spec.source != "union" and not spec.overrides and not spec.pad_to_multiple_of and same
    ):
        return None
    from shardmerge.resolve import small_files_folder

    vocabs = []
    for model, count in zip(models, rows, strict=True):
        folder = small_files_folder(model, VOCAB_FILES)
        vocabs.append(read_vocab(folder, model.label, count))
    base = 0 if recipe.method == "slerp" or recipe.first_merged == 1 else None
    try:
        plan = plan_vocab(spec, vocabs, base, [m.label for m in models])
    except ValueError as exc:
        raise InputError(str(exc).replace("\n", "; ")) from None
    if plan.new_tokens:
        extended_tokenizer(small_files_folder(models[plan.source], VOCAB_FILES), plan)
    return plan


def read_vocab(folder: Path, label: str, rows: int | None) -> TokenizerVocab:
    """The vocabulary of the tokenizer.json in ``folder``.

    Raises:
        InputError: no tokenizer.json (saying which tokenizer files there are), or unreadable.
    """
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            what = "a SentencePiece tokenizer (tokenizer.model)"
        elif (folder / "vocab.json").is_file():
            what = "a slow BPE tokenizer (vocab.json, merges.txt)"
        else:
            what = "no tokenizer files"
        raise InputError(
            f"{label}: has {what} but no tokenizer.json, which merging vocabularies needs; save "
            "a fast tokenizer next to it (transformers: AutoTokenizer.from_pretrained(folder)"
            ".save_pretrained(folder)) or choose the tokenizer of a model that shares its "
            "vocabulary"
        )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError(
            "merging different vocabularies needs the tokenizers library: pip install "
            "'shardmerge[vocab]'"
        ) from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise InputError(f"{label}: {TOKENIZER_JSON} cannot be read ({exc})") from None
    tokens = tokenizer.get_vocab(with_added_tokens=True)
    added = {
        t.content: AddedToken(t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
        for t in tokenizer.get_added_tokens_decoder().values()
    }
    return TokenizerVocab(
        label=label,
        kind=type(tokenizer.model).__name__,
        tokens=tokens,
        added=added,
        rows=rows if rows is not None else max(tokens.values(), default=-1) + 1,
        chat_template=read_chat_template(folder),
    )


def read_chat_template(folder: Path) -> str | None:
    """The chat template of a tokenizer folder (chat_template.jinja, else tokenizer_config's)."""
    jinja = folder / TEMPLATE_FILES[0]
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("chat_template") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def resolve_chat_template(name: str, folders: Sequence[Path]) -> str | None:
    """The template text of a recipe's chat_template: chatml, auto (the inputs' most common;
    None if none has one) or the Jinja string itself."""
    if name == "chatml":
        return CHATML
    if name == "auto":
        found = [t for t in (read_chat_template(f) for f in folders) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    return name


def extended_tokenizer(source: Path, plan: VocabPlan) -> Any:
    """The source's tokenizer.json (a ``tokenizers.Tokenizer``) with the plan's new tokens
    appended, their flags kept.

    Raises:
        InputError: the library gives the new tokens other ids than planned (checked while
            planning, so before any tensor is read).
    """
    from tokenizers import AddedToken as LibraryToken
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / TOKENIZER_JSON))
    for token, _ in plan.new_tokens:
        added = LibraryToken(
            token.content,
            single_word=token.single_word,
            lstrip=token.lstrip,
            rstrip=token.rstrip,
            normalized=token.normalized,
            special=token.special,
        )
        if token.special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
    wrong = [t for t, i in plan.new_ids.items() if tokenizer.token_to_id(t) != i]
    if wrong:
        raise InputError(
            f"{source / TOKENIZER_JSON}: appending {len(wrong)} token(s) gives other ids than "
            f"the embedding rows planned for them (first: {wrong[0]!r}: "
            f"{tokenizer.token_to_id(wrong[0])} vs {plan.new_ids[wrong[0]]}; the tokenizer's ids "
            "have gaps?); choose one model's tokenizer instead"
        )
    return tokenizer


def write_tokenizer(work: Path, source: Path, plan: VocabPlan) -> None:
    """The source tokenizer extended by the plan (:func:`extended_tokenizer`) written into
    ``work``: tokenizer.json (the tokenizers library), tokenizer_config.json's
    added_tokens_decoder, the source's special-token map and chat template files. Vocabulary
    files of a slow tokenizer (tokenizer.model, vocab.json, ...) would disagree and are left out,
    as mergekit does for unions."""
    tokenizer = extended_tokenizer(source, plan)
    tokenizer.save(str(work / TOKENIZER_JSON))
    config: dict[str, Any] = {}
    if (source / TOKENIZER_CONFIG).is_file():
        loaded = json.loads((source / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    decoder = dict(config.get("added_tokens_decoder") or {})
    for token, _ in plan.new_tokens:
        decoder[str(plan.new_ids[token.content])] = {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
    config["added_tokens_decoder"] = decoder
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (work / TOKENIZER_CONFIG).write_text(text, encoding="utf-8")
    for name in ("special_tokens_map.json", *TEMPLATE_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, work / name)


def set_chat_template(work: Path, template: str) -> None:
    """Write ``template`` into the output's tokenizer_config.json (the only copy of it)."""
    path = work / TOKENIZER_CONFIG
    config: dict[str, Any] = {}
    if path.is_file():
        loaded = json.loads(path.read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    config["chat_template"] = template
    for name in TEMPLATE_FILES:  # a separate template file would take precedence
        (work / name).unlink(missing_ok=True)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def vocab_config(
    config: dict[str, Any], plan: VocabPlan | None, source_config: dict[str, Any] | None
) -> dict[str, Any]:
    """config.json with the output's vocab_size and (tokenizer from another model than the
    config's) that model's special-token ids."""
    config = dict(config)
    if plan is not None:
        text = config.get("text_config")
        if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
            config["text_config"] = {**text, "vocab_size": plan.rows}
        else:
            config["vocab_size"] = plan.rows
    if source_config is not None and source_config is not config:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in source_config:
                config[key] = source_config[key]
    return config
