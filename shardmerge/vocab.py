"""Vocabularies of the inputs -> the output vocabulary and where each embedding row comes from.

Pure: no files, no torch, no tokenizer library. :mod:`shardmerge.tokenizer_files` reads the
tokenizers into :class:`TokenizerVocab`; :func:`plan_vocab` decides the output vocabulary and,
for every model and output row, which input row the model's re-indexed embedding takes there
(mergekit's rules, ``tokenizer/embed.py``):

- the model's own row, where it has the token;
- else the row of the one model that has it; else the base's row; else the mean of the rows of
  the models that have it; else zero (with a warning); a ``tokens`` override decides instead;
- padding rows (beyond the tokenizer) the mean of the model's real rows.

:func:`gather_tensors` turns a model's vocabulary-indexed tensors (first axis = its embedding
rows) into :class:`GatheredTensor` views that the readers fill row by row, chunk by chunk.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shardmerge.inventory import DTYPE_SIZES, TensorInfo

__all__ = [
    "AddedToken",
    "GatheredTensor",
    "TokenOverride",
    "TokenizerVocab",
    "VocabPlan",
    "VocabSpec",
    "plan_vocab",
]

_MAX_LISTED = 10


@dataclass(frozen=True)
class AddedToken:
    """An added token and its flags, as tokenizers keeps them."""

    content: str
    special: bool = False
    normalized: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


@dataclass(frozen=True)
class TokenizerVocab:
    """One model's tokenizer, as far as the merge needs it."""

    label: str
    kind: str  # the tokenizers model type: BPE, Unigram, WordPiece, WordLevel
    tokens: Mapping[str, int]  # every token (added ones included) -> id
    added: Mapping[str, AddedToken]  # added tokens by content
    rows: int  # the model's embedding rows (config vocab_size)
    chat_template: str | None = None


@dataclass(frozen=True)
class TokenOverride:
    """A ``tokenizer.tokens`` entry: token's row from ``model`` (its own row of the token, or
    of ``source_token`` / ``source_id``), or zero (``model`` None)."""

    token: str
    model: int | None
    source_token: str | None = None
    source_id: int | None = None
    force: bool = False
    where: str = ""  # the recipe location, for messages


@dataclass(frozen=True)
class VocabSpec:
    """The recipe's vocabulary choices; ``source``: "union" or an index into recipe.models."""

    source: Literal["union"] | int
    overrides: tuple[TokenOverride, ...] = ()
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None  # a name (chatml), "auto" or a Jinja string


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary and, per model, where each of its re-indexed rows comes from."""

    source: int  # the model whose tokenizer the output starts from
    new_tokens: tuple[tuple[AddedToken, int], ...]  # appended to it: (token, model it came from)
    rows: int  # output embedding rows, padding included
    real_rows: int  # rows that are tokens
    model_rows: tuple[int, ...]  # each input's embedding rows
    own: tuple[Sequence[int], ...]  # per model, per output row: its own row, or -1
    fill: Mapping[int, tuple[tuple[int, int], ...]]  # row -> (model, row)s averaged; () = zero
    identity: bool  # every model's rows are already the output's
    report: tuple[str, ...]
    warnings: tuple[str, ...]
    chat_template: str | None = None  # resolved: the text to write, None = keep the source's
    new_ids: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class GatheredTensor(TensorInfo):
    """A model's vocabulary-indexed tensor re-indexed to the output vocabulary: the inherited
    fields describe the output shape, ``sources`` every model's stored tensor (read from)."""

    model: int
    sources: tuple[TensorInfo, ...]
    vocab: VocabPlan
    # The mean of the real rows (padding), filled on first use by the reader.
    cache: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def row_numel(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


def plan_vocab(
    spec: VocabSpec, vocabs: Sequence[TokenizerVocab], base: int | None, labels: Sequence[str]
) -> VocabPlan:
    """The output vocabulary of ``spec`` over ``vocabs`` (in the recipe's order).

    Args:
        base: index of the base model (its rows win for tokens several models have), or None.
        labels: how messages name each model.

    Raises:
        ValueError: problems with the vocabularies or overrides, one per line.
    """
    problems: list[str] = []
    warnings: list[str] = []
    source = spec.source if isinstance(spec.source, int) else (base if base is not None else 0)
    first = vocabs[source]
    out: dict[str, int] = {t: i for t, i in first.tokens.items() if i < first.rows}
    beyond = len(first.tokens) - len(out)
    if beyond:
        warnings.append(
            f"{labels[source]}: {beyond} tokenizer token(s) have ids beyond its {first.rows} "
            "embedding rows and are left out"
        )
    new_tokens: list[tuple[AddedToken, int]] = []
    if spec.source == "union" and beyond:
        problems.append(
            f"tokenizer_source: union: the tokenizer of {labels[source]} has {beyond} token(s) "
            f"beyond its {first.rows} embedding rows, so new tokens cannot follow it; choose "
            "one model's tokenizer instead"
        )
    elif spec.source == "union":
        kinds = {v.kind for v in vocabs}
        if len(kinds) > 1:
            which = ", ".join(f"{label}: {v.kind}" for label, v in zip(labels, vocabs, strict=True))
            problems.append(
                f"tokenizer_source: union: the tokenizers are of different types ({which}); "
                "a union needs one type: choose one model's tokenizer instead"
            )
        next_id = max(out.values(), default=-1) + 1
        # mergekit's order: every model's plain tokens first, then the added tokens.
        for added_pass in (False, True):
            for i, v in enumerate(vocabs):
                for tok, idx in sorted(v.tokens.items(), key=lambda item: item[1]):
                    if idx >= v.rows or (tok in v.added) != added_pass or tok in out:
                        continue
                    out[tok] = next_id
                    next_id += 1
                    new_tokens.append((v.added.get(tok, AddedToken(tok, normalized=True)), i))
    real_rows = max(out.values(), default=-1) + 1
    # A padded embedding (more rows than tokens, e.g. Qwen2.5) keeps its size rather than
    # shrinking to the tokenizer (mergekit #425); new tokens use the spare rows first.
    rows = max(real_rows, first.rows)
    if spec.pad_to_multiple_of:
        rows = -(-rows // spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    by_id = {i: t for t, i in out.items()}

    own: list[array[int]] = []
    for v in vocabs:
        table = array("q", [-1]) * rows
        for r in range(real_rows):
            name = by_id.get(r)
            idx = v.tokens.get(name, -1) if name is not None else -1
            if 0 <= idx < v.rows:
                table[r] = idx
        # A padded embedding keeps its own rows beyond the tokenizer (no token reads them);
        # rows it lacks there get the mean of its real rows.
        used = set(v.tokens.values())
        for r in range(real_rows, min(rows, v.rows)):
            if r not in used:
                table[r] = r
        own.append(table)

    overrides = {o.token: o for o in spec.overrides}
    fill: dict[int, tuple[tuple[int, int], ...]] = {}
    counts = {"donor": 0, "base": 0, "mean": 0, "zero": 0}
    only_in: dict[int, list[str]] = {}
    zeros: list[str] = []
    for o in spec.overrides:
        if o.token not in out:
            problems.append(f"{o.where}: token {o.token!r} is not in the output vocabulary")
            continue
        r = out[o.token]
        if o.model is None:
            fill[r] = ()
        else:
            src = vocabs[o.model]
            if o.source_id is not None:
                k = o.source_id
            elif o.source_token is not None:
                k = src.tokens.get(o.source_token, -1)
            else:
                k = own[o.model][r]
            if not 0 <= k < src.rows:
                what = o.source_token if o.source_token is not None else o.token
                shown = f"row {k}" if o.source_id is not None else f"token {what!r}"
                problems.append(f"{o.where}: {labels[o.model]} has no {shown}")
                continue
            fill[r] = ((o.model, k),)
        if o.force:
            for table in own:
                table[r] = -1
    for r in range(real_rows):
        token = by_id.get(r)
        if token is None or token in overrides:
            if token is None:
                fill[r] = ()  # an id the tokenizer skips: mergekit leaves its row zero
            continue
        has = [i for i, table in enumerate(own) if table[r] >= 0]
        if len(has) == len(own):
            continue
        if len(has) == 1:
            fill[r] = ((has[0], own[has[0]][r]),)
            counts["donor"] += 1
            only_in.setdefault(has[0], []).append(token)
        elif not has:
            fill[r] = ()
            counts["zero"] += 1
            zeros.append(token)
        elif base is not None and base in has:
            fill[r] = ((base, own[base][r]),)
            counts["base"] += 1
        else:
            fill[r] = tuple((i, own[i][r]) for i in has)
            counts["mean"] += 1
    if zeros:
        warnings.append(
            f"{len(zeros)} token(s) are in no model's embedding and get zero rows: "
            + _listed(zeros)
        )
    # A row merged from several models where one of them only reserved it (an added token in
    # one tokenizer, a plain or reserved one in another) may mix a trained row with an
    # untrained one; the headers cannot tell, so say which tokens to look at.
    mixed = [
        tok
        for tok, r in out.items()
        if r not in fill
        and any(tok in v.added for v in vocabs)
        and not all(tok in v.added for v in vocabs)
    ]
    if mixed:
        warnings.append(
            f"{len(mixed)} token(s) are added tokens in some models but not in others; their "
            "merged rows may mix a trained row with an untrained one (take them from one model "
            "with tokenizer.tokens): " + _listed(mixed)
        )
    if problems:
        raise ValueError("\n".join(problems))

    identity = not fill and all(
        v.rows == rows and all(table[r] == r for r in range(rows))
        for v, table in zip(vocabs, own, strict=True)
    )
    report = [
        "vocabulary: "
        + ", ".join(f"{label} {v.rows} rows" for label, v in zip(labels, vocabs, strict=True))
        + f"; output {rows} rows ({real_rows} tokens, "
        + ("union" if spec.source == "union" else f"the tokenizer of {labels[source]}")
        + (
            f", padded to a multiple of {spec.pad_to_multiple_of}"
            if spec.pad_to_multiple_of
            else ""
        )
        + ")"
    ]
    if identity:
        report.append("  every model already has these rows: nothing is re-indexed")
    for i, toks in only_in.items():
        report.append(
            f"  {len(toks)} token(s) only in {labels[i]} (every model takes its row): "
            + _listed(toks)
        )
    if counts["base"]:
        report.append(f"  {counts['base']} row(s) from {labels[base or 0]} for models lacking them")
    if counts["mean"]:
        report.append(f"  {counts['mean']} row(s) the mean of the models that have them")
    if counts["zero"]:
        report.append(f"  {counts['zero']} row(s) zero (in no model)")
    if overrides:
        report.append(f"  {len(overrides)} row(s) set by tokenizer.tokens")
    if rows > real_rows:
        report.append(
            f"  {rows - real_rows} padding row(s): a padded model's own, else the mean of the "
            "model's real rows"
        )
    return VocabPlan(
        source=source,
        new_tokens=tuple(new_tokens),
        rows=rows,
        real_rows=real_rows,
        model_rows=tuple(v.rows for v in vocabs),
        own=tuple(own),
        fill=fill,
        identity=identity,
        report=tuple(report),
        warnings=tuple(warnings),
        new_ids={t.content: out[t.content] for t, _ in new_tokens},
    )


def _listed(tokens: Sequence[str]) -> str:
    shown = ", ".join(repr(t) for t in tokens[:_MAX_LISTED])
    return shown + (f" and {len(tokens) - _MAX_LISTED} more" if len(tokens) > _MAX_LISTED else "")


def gather_tensors(
    vocab: VocabPlan, sources: Sequence[Mapping[str, TensorInfo]]
) -> tuple[list[dict[str, TensorInfo]], list[str]]:
    """Every model's tensors with its vocabulary-indexed ones (first axis = the model's
    embedding rows in every model, other axes equal) replaced by :class:`GatheredTensor` views;
    and the names re-indexed."""
    out = [dict(s) for s in sources]
    names = []
    for name, first in sources[0].items():
        infos = [s.get(name) for s in sources]
        if any(
            info is None
            or not info.shape
            or info.shape[0] != rows
            or info.shape[1:] != first.shape[1:]
            or not info.is_float
            for info, rows in zip(infos, vocab.model_rows, strict=True)
        ):
            continue
        stored = tuple(i for i in infos if i is not None)
        names.append(name)
        for m, info in enumerate(stored):
            out[m][name] = GatheredTensor(
                name=info.name,
                dtype=info.dtype,
                shape=(vocab.rows, *info.shape[1:]),
                file=info.file,
                begin=info.begin,
                end=info.end,
                model=m,
                sources=stored,
                vocab=vocab,
            )
    return out, names
