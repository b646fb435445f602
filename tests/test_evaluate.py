"""``shardmerge eval`` on tiny randomly initialised Llama models built here (nothing downloaded)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from shardmerge import evaluate
from shardmerge.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tokenizer() -> object:
    words = sorted(set(re.findall(r"\w+|[^\w\s]", evaluate.SAMPLE_TEXT)))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _llama(folder: Path, seed: int, *, vocab: int | None = None, like: Path | None = None) -> Path:
    """A 2-layer Llama with hidden size 32 (random, or ``like``'s weights plus a little noise)."""
    tokenizer = _tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    if like is not None:
        parent = transformers.LlamaForCausalLM.from_pretrained(str(like))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p, q in zip(model.parameters(), parent.parameters(), strict=True):
                p.copy_(q + 0.02 * torch.randn(q.shape, generator=g))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llamas")
    a = _llama(root / "a", seed=0)
    return a, _llama(root / "b", seed=1, like=a)


def test_parent_against_itself_has_kl_zero(parents: tuple[Path, Path]) -> None:
    a, b = parents
    report = evaluate.evaluate_merge(a, (a, b), device="cpu")
    merged, score_a, score_b = report.scores
    assert report.ok and report.tokens > 100
    assert score_a.perplexity == pytest.approx(merged.perplexity, rel=1e-9)
    assert score_a.kl_from_merged == pytest.approx(0.0, abs=1e-9)
    assert score_b.kl_from_merged is not None and 1e-6 < score_b.kl_from_merged < 1.0
    assert all(math.isfinite(s.perplexity) and s.perplexity > 1 for s in report.scores)


def test_windows_and_batches_score_the_same_tokens(
    parents: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of 24 tokens, batches of 2 and a shorter last window: each token of each window
    after its first is predicted once, and the parent-vs-itself identities still hold."""
    a, b = parents
    monkeypatch.setattr(evaluate, "WINDOW_TOKENS", 24)
    monkeypatch.setattr(evaluate, "BATCH_WINDOWS", 2)
    seen: list[int] = []
    original = evaluate._window_logprobs

    def spy(*args: object):  # type: ignore[no-untyped-def]
        for window, logprobs in original(*args):  # type: ignore[arg-type]
            assert logprobs.shape[0] == window.numel() - 1
            seen.append(window.numel())
            yield window, logprobs

    monkeypatch.setattr(evaluate, "_window_logprobs", spy)
    report = evaluate.evaluate_merge(b, (a, b), max_tokens=100, device="cpu")
    assert report.tokens == 100 and seen[:5] == [24, 24, 24, 24, 4]
    assert report.scores[2].kl_from_merged == pytest.approx(0.0, abs=1e-9)


def test_eval_of_a_real_merge(
    parents: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = parents
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\nt: 0.5\n")
    out = tmp_path / "merged"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    text = tmp_path / "text.txt"
    text.write_text("She made a pot of tea and sat down at the table . " * 5)
    capsys.readouterr()
    assert main(["eval", str(out), "--against", str(a), str(b), "--text", str(text)]) == 0
    printed = capsys.readouterr().out
    assert f"text: {text}, " in printed and "ok: " in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[3:6]}
    assert set(rows) == {"merged", "A", "B"}
    kl_a, kl_b = float(rows["A"][2]), float(rows["B"][2])
    assert 0 < kl_a < 1 and 0 < kl_b < 1


def test_a_broken_merge_is_flagged_in_plain_words(
    parents: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = parents
    model = transformers.LlamaForCausalLM.from_pretrained(str(a))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(math.nan)
    model.save_pretrained(str(tmp_path / "nan"))
    assert main(["eval", str(tmp_path / "nan"), "--against", str(a), str(b)]) == 1
    assert "PROBLEM: the merged model's predictions contain NaN or Inf" in capsys.readouterr().out

    with torch.no_grad():  # garbage, but finite: perplexity far above both parents'
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 3)
    model.save_pretrained(str(tmp_path / "garbage"))
    report = evaluate.evaluate_merge(tmp_path / "garbage", (a, b), device="cpu")
    assert len(report.problems) == 1 and "more than 2x the worse parent's" in report.problems[0]


def test_bad_inputs_exit_2(
    parents: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = parents

    def error(*args: str) -> str:
        assert main(["eval", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        return captured.err.strip().splitlines()[-1]  # after the test's own saving bars

    other = _llama(tmp_path / "other", seed=2, vocab=len(_tokenizer()) + 5)
    assert error(str(a), "--against", str(other), str(b)) == (
        f"error: {other}: vocabulary of {len(_tokenizer()) + 5} tokens but the merged model has "
        f"{len(_tokenizer())}: not parents of this merge"
    )
    assert error(str(tmp_path), "--against", str(a), str(b)) == (
        f"error: {tmp_path}: no config.json: not a transformers model folder"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "the file is empty" in error(str(a), "--against", str(a), str(b), "--text", str(empty))
    assert "at least 2" in error(str(a), "--against", str(a), str(b), "--max-tokens", "1")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert error(str(a), "--against", str(a), str(b)) == (
        'error: eval needs transformers: pip install "shardmerge[eval]" (or pip install transformers)'
    )


def test_update_card_adds_the_table_once(
    parents: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = parents
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\nt: 0.5\n")
    out = tmp_path / "merged"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    before = (out / "README.md").read_text()
    argv = ["eval", str(out), "--against", str(a), str(b), "--max-tokens", "40", "--update-card"]
    assert main(argv) == 0
    once = (out / "README.md").read_text()
    assert main(argv) == 0
    twice = (out / "README.md").read_text()
    assert once == twice  # replaced, not added again (the same tokens give the same numbers)
    assert twice.count("## Quick evaluation") == 1 and twice.count(evaluate.CARD_BEGIN) == 1
    section = twice[twice.index(evaluate.CARD_BEGIN) : twice.index(evaluate.CARD_END)]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| merged (this model) |") and "| A: `a` |" in rows[2]
    assert float(rows[2].split("|")[3]) > 0  # KL(A || merged)
    assert str(a) not in section  # folders by name, never a machine path
    # Everything else is as the merge wrote it; the section comes before the recipe.
    start, end = twice.index(evaluate.CARD_BEGIN), twice.index(evaluate.CARD_END)
    rest = twice[:start] + twice[end + len(evaluate.CARD_END) + 1 :]
    assert rest.replace("\n\n\n", "\n\n") == before.replace("\n\n\n", "\n\n")
    assert twice.index(evaluate.CARD_END) < twice.index("## Recipe")
    capsys.readouterr()


def test_update_card_replaces_an_older_section() -> None:
    card = "# m\n\n## Recipe\n\nx\n"
    first = evaluate.with_eval_section(card, "## Quick evaluation\n\nold\n")
    second = evaluate.with_eval_section(first, "## Quick evaluation\n\nnew\n")
    assert "old" not in second and second.count("new") == 1
    assert second == evaluate.with_eval_section(card, "## Quick evaluation\n\nnew\n")
    bare = evaluate.with_eval_section("# m\n", "s")  # no recipe section: at the end
    assert bare == f"# m\n\n{evaluate.CARD_BEGIN}\ns\n{evaluate.CARD_END}\n"


def test_update_card_without_a_card_exits_2_before_loading(
    parents: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = parents
    argv = ["eval", str(a), "--against", str(a), str(b), "--update-card"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{a / 'README.md'} does not exist" in err and "perplexity" not in err
