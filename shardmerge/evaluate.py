"""``shardmerge eval``: a quick sanity check of a merge against its parents (transformers extra).

Perplexity of the merged model and of each parent on a short text, and the mean KL divergence
KL(parent || merged) of the next-token distributions at every position: how far the merged
model's predictions are from each parent's (0 when they agree). One model is in memory at a
time; the merged model's log-probabilities are kept meanwhile (tokens x vocabulary x 4 bytes:
1024 tokens of a 128k vocabulary are 0.5 GB), so ``--max-tokens`` bounds the memory.

Not a benchmark: a merge that went wrong (NaN outputs, a perplexity far above both parents')
shows up in seconds, before an upload or a leaderboard run.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardmerge.errors import InputError

if TYPE_CHECKING:
    import torch

# Written for this check: everyday English, no names or numbers a small model could not know.
SAMPLE_TEXT = """\
The kitchen was quiet in the early morning, and the only sound was the kettle slowly coming to \
the boil. She opened the window to let in the cool air and looked out over the garden. The grass \
was still wet, and a thin mist hung above the vegetable beds at the far end. It had rained for \
most of the night, but now the sky was clearing, and the first light was touching the tops of \
the trees.

She made a pot of tea and sat down at the table with a notebook. There was a lot to do before \
the weekend. The fence by the road needed to be repaired, the shed was full of boxes that no one \
had opened for years, and her brother was coming to stay on Saturday with his two children. She \
wrote a short list, crossed out one line, and added two more.

When the tea had cooled a little, she carried her cup outside and walked along the path. The \
tomatoes had grown much taller in the past week, and some of the beans were ready to pick. She \
filled a small basket, then stopped to listen to a bird singing somewhere in the hedge. For a \
moment she forgot about the list. The day would be long and busy, but it had started well, and \
that was enough for now.

In the afternoon the wind picked up. Clouds moved quickly across the sky, and the washing on the \
line swung back and forth. She brought it in before the next shower, folded the sheets on the \
kitchen table, and put the kettle on again.
"""
DEFAULT_MAX_TOKENS = 1024
# Tokens per window: each window is scored on its own (its first token has no context).
WINDOW_TOKENS = 512
BATCH_WINDOWS = 4
# A merged perplexity this many times the worse parent's is flagged: merging two fine-tunes of
# one base lands near them; several times worse means broken weights, not a trade-off.
SUSPECT_RATIO = 2.0


@dataclass(frozen=True)
class ModelScore:
    role: str  # "merged", "A", "B"
    path: Path
    perplexity: float
    kl_from_merged: float | None  # mean KL(this model || merged); None for the merged model


@dataclass(frozen=True)
class EvalReport:
    text_source: str
    tokens: int
    scores: tuple[ModelScore, ...]
    problems: tuple[str, ...]  # plain-words reasons the merge looks wrong; empty: sane

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        rows = [["model", "perplexity", "KL(parent || merged)", "path"]]
        for s in self.scores:
            kl = "-" if s.kl_from_merged is None else f"{s.kl_from_merged:.5f}"
            rows.append([s.role, f"{s.perplexity:.3f}", kl, str(s.path)])
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"text: {self.text_source}, {self.tokens} tokens", ""]
        for r in rows:
            cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3]]
            lines.append("  ".join(cells))
        lines.append("")
        if self.ok:
            lines.append("ok: the merged model's numbers are finite and near its parents'")
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The card's section: the same table, parents named by folder (no machine paths)."""
        lines = [
            "## Quick evaluation",
            "",
            f"`shardmerge eval` on {self.tokens} tokens of the "
            + (
                "built-in English sample"
                if self.text_source == "built-in sample"
                else f"text `{Path(self.text_source).name}`"
            )
            + ": perplexity of each model, and the mean KL divergence of the merged model's "
            "next-token distributions from each parent's (0: they predict alike).",
            "",
            "| model | perplexity | KL(parent \\|\\| merged) |",
            "|---|---:|---:|",
        ]
        for s in self.scores:
            kl = "-" if s.kl_from_merged is None else f"{s.kl_from_merged:.5f}"
            name = "merged (this model)" if s.role == "merged" else f"{s.role}: `{s.path.name}`"
            lines.append(f"| {name} | {s.perplexity:.3f} | {kl} |")
        lines.append("")
        if self.ok:
            lines.append("The merged model's numbers are finite and near its parents'.")
        lines += [f"**Problem:** {p}" for p in self.problems]
        return "\n".join(lines) + "\n"


# The card's eval section sits between these markers: a later --update-card replaces it.
CARD_BEGIN = "<!-- shardmerge eval -->"
CARD_END = "<!-- /shardmerge eval -->"


def check_card(merged: Path) -> Path:
    """The card --update-card will change (checked before any model is loaded)."""
    card = merged / "README.md"
    if not card.is_file():
        raise InputError(f"--update-card: {card} does not exist (no model card to add to)")
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--update-card: cannot read {card} ({exc})") from None
    if text.count(CARD_BEGIN) != text.count(CARD_END) or text.count(CARD_BEGIN) > 1:
        raise InputError(
            f"--update-card: {card} has unmatched {CARD_BEGIN} markers; fix them by hand"
        )
    return card


def with_eval_section(card: str, section: str) -> str:
    """``card`` with its eval section replaced by ``section`` (or added before the recipe, else
    at the end)."""
    block = f"{CARD_BEGIN}\n{section.rstrip()}\n{CARD_END}\n"
    begin = card.find(CARD_BEGIN)
    if begin >= 0:
        end = card.index(CARD_END, begin) + len(CARD_END)
        rest = card[end:]
        return card[:begin] + block + (rest[1:] if rest.startswith("\n") else rest)
    anchor = card.find("\n## Recipe\n")
    if anchor >= 0:
        return card[: anchor + 1] + block + "\n" + card[anchor + 1 :]
    return card.rstrip("\n") + "\n\n" + block


def update_card(card: Path, report: EvalReport) -> None:
    """Write ``report``'s section into ``card`` (atomically: temp file, then rename)."""
    text = with_eval_section(card.read_text(encoding="utf-8"), report.markdown())
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(card)


def read_text(path: Path | None) -> tuple[str, str]:
    """(text, how the report names it): the user's UTF-8 file, or the built-in sample."""
    if path is None:
        return SAMPLE_TEXT, "built-in sample"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--text {path}: cannot read it as UTF-8 text ({exc})") from None
    if not text.strip():
        raise InputError(f"--text {path}: the file is empty")
    return text, str(path)


def evaluate_merge(
    merged: Path,
    parents: tuple[Path, Path],
    *,
    text_path: Path | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    device: str = "auto",
) -> EvalReport:
    """Score ``merged`` and both ``parents`` on the same tokens (the merged model's tokenizer).

    Raises:
        InputError: a folder that is not a transformers causal LM, no tokenizer, too little text,
            or vocabularies that differ; the transformers extra missing.
    """
    if max_tokens < 2:
        raise InputError("--max-tokens must be at least 2 (one token predicts the next)")
    for path in (merged, *parents):
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: no config.json: not a transformers model folder")
    text, source = read_text(text_path)
    transformers = _transformers()
    from shardmerge import import_torch
    from shardmerge.pipeline import resolve_device

    import_torch()  # the CLI's first torch import, with the collector paused
    import torch

    dev = torch.device(resolve_device(device))
    tokenizer = _tokenizer(transformers, merged, parents)
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise InputError(f"{source}: fewer than 2 tokens: nothing to predict")
    token_ids = torch.tensor(ids, dtype=torch.long)

    merged_logprobs: list[torch.Tensor] = []
    scores = []
    for role, path in (("merged", merged), ("A", parents[0]), ("B", parents[1])):
        model = _load(transformers, torch, path, dev)
        nll, count, kl_sum = 0.0, 0, 0.0
        for i, (window, logprobs) in enumerate(_window_logprobs(torch, model, token_ids, dev)):
            if role == "merged":
                merged_logprobs.append(logprobs)
            else:
                reference = merged_logprobs[i]
                if logprobs.shape != reference.shape:
                    raise InputError(
                        f"{path}: vocabulary of {logprobs.shape[-1]} tokens but the merged model "
                        f"has {reference.shape[-1]}: not parents of this merge"
                    )
                kl = (logprobs.exp() * (logprobs - reference)).sum(-1)
                kl_sum += float(kl.double().sum())
            targets = window[1:].unsqueeze(-1)
            nll -= float(logprobs.gather(-1, targets).double().sum())
            count += targets.numel()
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        perplexity = math.exp(nll / count) if math.isfinite(nll) else math.nan
        kl_mean = None if role == "merged" else kl_sum / count
        scores.append(ModelScore(role, path, perplexity, kl_mean))
    problems = _judge(scores)
    return EvalReport(source, len(ids), tuple(scores), tuple(problems))


def _judge(scores: list[ModelScore]) -> list[str]:
    merged, parents = scores[0], scores[1:]
    problems = []
    if not math.isfinite(merged.perplexity):
        problems.append(
            "the merged model's predictions contain NaN or Inf: its weights are broken "
            "(check the inputs with `shardmerge verify`)"
        )
    worst = max(p.perplexity for p in parents)
    if math.isfinite(merged.perplexity) and merged.perplexity > SUSPECT_RATIO * worst:
        problems.append(
            f"the merged model's perplexity ({merged.perplexity:.2f}) is more than "
            f"{SUSPECT_RATIO:g}x the worse parent's ({worst:.2f}): the merge probably went wrong "
            "(models that do not share a base, or a t schedule that mixes unrelated layers)"
        )
    for p in parents:
        if p.kl_from_merged is not None and not math.isfinite(p.kl_from_merged):
            problems.append(f"KL from model {p.role} is not finite")
    return problems


def _window_logprobs(
    torch: Any, model: Any, token_ids: torch.Tensor, dev: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(window ids, float32 log-probs of each next token) per window, batched, on the CPU."""
    length = min(WINDOW_TOKENS, _max_positions(model))
    windows = [token_ids[s : s + length] for s in range(0, token_ids.numel(), length)]
    windows = [w for w in windows if w.numel() >= 2]
    batch: list[torch.Tensor] = []
    for i, window in enumerate(windows):
        batch.append(window)
        nxt = windows[i + 1] if i + 1 < len(windows) else None
        if len(batch) == BATCH_WINDOWS or nxt is None or nxt.numel() != window.numel():
            with torch.inference_mode():
                logits = model(torch.stack(batch).to(dev)).logits[:, :-1]
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            yield from zip(batch, logprobs, strict=True)
            batch = []


def _max_positions(model: Any) -> int:
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value >= 2 else WINDOW_TOKENS


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError(
            'eval needs transformers: pip install "shardmerge[eval]" (or pip install transformers)'
        ) from None
    return transformers


def _tokenizer(transformers: Any, merged: Path, parents: tuple[Path, Path]) -> Any:
    for path in (merged, *parents):
        if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            return transformers.AutoTokenizer.from_pretrained(str(path))
    raise InputError(f"{merged}: no tokenizer files in it or in its parents' folders")


def _load(transformers: Any, torch: Any, path: Path, dev: torch.device) -> Any:
    # float32 on the CPU (bf16 matmuls there are slow and less exact); as stored on a GPU.
    dtype = torch.float32 if dev.type == "cpu" else "auto"
    major = int(transformers.__version__.split(".")[0])
    key = "dtype" if major >= 5 else "torch_dtype"  # renamed in transformers 5
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # three "Loading weights" bars would bury the report
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **{key: dtype})
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot load it as a causal LM ({first})") from None
    finally:
        if shown:
            with warnings.catch_warnings():  # "cannot enable" under HF_HUB_DISABLE_PROGRESS_BARS
                warnings.simplefilter("ignore")
                bars.enable_progress_bar()
    return model.to(dev).eval()
