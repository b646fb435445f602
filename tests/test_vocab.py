"""Different vocabularies: the output vocabulary, re-indexed embedding rows (streamed), the
output tokenizer files, and agreement with mergekit 0.1.5 (where benchmarks/.venv-mergekit
exists). Every tokenizer is a real tiny one built here with the tokenizers library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardmerge import cli
from shardmerge.vocab import AddedToken, TokenizerVocab, TokenOverride, VocabSpec, plan_vocab
from tests.conftest import needs_mergekit, run_mergekit, write_checkpoint

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS = 16, 32, 2
# Four tokens a chat fine-tune adds: two special, two plain.
ADDED = [("<|im_start|>", True), ("<|im_end|>", True), ("<tool>", False), ("foo_bar", False)]


def _tokenizer(folder: Path, added: list[tuple[str, bool]], extra_plain: tuple[str, ...] = ()):
    """A tiny BPE tokenizer (68 tokens: specials, letters, digits, three merges) plus ``added``,
    saved with transformers as a model's tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = [*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", "he", "ll", "hell"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *plain, *extra_plain])}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    for content, special in added:
        fast.add_tokens(transformers.AddedToken(content, special=special), special_tokens=special)
    fast.save_pretrained(str(folder))
    return len(fast.get_vocab())


def _config(vocab: int, tied: bool = False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def _llama(vocab: int, seed: int, tied: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            state[p + f"self_attn.{proj}_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        state[p + "mlp.gate_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g)
        state[p + "mlp.up_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g)
        state[p + "mlp.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=g)
        state[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        state[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    state["model.norm.weight"] = torch.ones(HIDDEN)
    if not tied:
        state["lm_head.weight"] = torch.randn(vocab, HIDDEN, generator=g)
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def _pair(root: Path, tied: bool = False) -> tuple[Path, Path, dict, dict]:
    """Model A (68 tokens) and its chat sibling B (A's tokens + the four ADDED)."""
    a_dir, b_dir = root / "a", root / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    n_a = _tokenizer(a_dir, [])
    n_b = _tokenizer(b_dir, ADDED)
    state_a = _llama(n_a, 1, tied)
    g = torch.Generator().manual_seed(2)
    state_b = {}
    for name, value in _llama(n_b, 3, tied).items():
        if value.shape[0] == n_b:  # the sibling: A's rows fine-tuned, new rows its own
            value[:n_a] = state_a[name] + 0.05 * torch.randn(state_a[name].shape, generator=g)
        else:
            value = state_a[name] + 0.05 * torch.randn(value.shape, generator=g)
        state_b[name] = value.to(torch.bfloat16)
    names = list(state_a)
    write_checkpoint(a_dir, state_a, None, _config(n_a, tied))
    write_checkpoint(b_dir, state_b, [names[:5], names[5:]], _config(n_b, tied))
    return a_dir, b_dir, state_a, state_b


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f.get_tensor(name)
    return out


def _steps(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance in bf16 steps (adjacent representable values) between x and y."""

    def key(t: torch.Tensor) -> torch.Tensor:
        bits = t.to(torch.bfloat16).view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((key(x) - key(y)).abs().max()) if x.numel() else 0


def _run(tmp_path: Path, recipe_text: str, out: str = "out") -> Path:
    recipe = tmp_path / f"{out}.yml"
    recipe.write_text(recipe_text)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / out), "--quiet"]) == 0
    return tmp_path / out


# --------------------------------------------------------------------------- the pure plan


def _vocab(label: str, tokens: list[str], added: tuple[str, ...] = (), rows: int | None = None):
    return TokenizerVocab(
        label,
        "BPE",
        {t: i for i, t in enumerate(tokens)},
        {t: AddedToken(t, special=True) for t in added},
        rows if rows is not None else len(tokens),
    )


def test_row_rules_follow_mergekit() -> None:
    base = _vocab("base", ["a", "b", "c"])
    one = _vocab("one", ["a", "b", "x", "y"], added=("y",))
    two = _vocab("two", ["b", "a", "x", "z", "c"])
    plan = plan_vocab(VocabSpec("union"), [base, one, two], 0, ["base", "one", "two"])
    # Base's tokens keep their ids; then plain tokens of the others, then added ones.
    assert plan.new_ids == {"x": 3, "z": 4, "y": 5}
    assert plan.rows == plan.real_rows == 6
    assert list(plan.own[2]) == [1, 0, 4, 2, 3, -1]  # two's own rows, by token
    assert plan.fill[2] == ((0, 2),)  # c: one lacks it; base has it -> base's row
    assert plan.fill[3] == ((1, 2), (2, 2))  # x: in one and two, not base -> their mean
    assert plan.fill[4] == ((2, 3),)  # z: only in two -> two's row for every model
    assert plan.fill[5] == ((1, 3),)
    # Without a base the shared token is averaged instead.
    no_base = plan_vocab(VocabSpec("union"), [base, one, two], None, ["base", "one", "two"])
    assert no_base.fill[2] == ((0, 2), (2, 4))


def test_padding_overrides_and_identity() -> None:
    a = _vocab("a", ["a", "b", "c"])
    b = _vocab("b", ["a", "b", "c"])
    assert plan_vocab(VocabSpec(0), [a, b], 0, ["a", "b"]).identity
    padded = plan_vocab(VocabSpec(0, pad_to_multiple_of=4), [a, b], 0, ["a", "b"])
    assert (padded.rows, padded.real_rows, padded.identity) == (4, 3, False)
    forced = VocabSpec(0, (TokenOverride("b", 1, force=True), TokenOverride("c", None, force=True)))
    plan = plan_vocab(forced, [a, b], 0, ["a", "b"])
    assert plan.own[0][1] == -1 and plan.fill[1] == ((1, 1),) and plan.fill[2] == ()
    with pytest.raises(ValueError, match="token 'q' is not in the output vocabulary"):
        plan_vocab(VocabSpec(0, (TokenOverride("q", 1, where="tokenizer.tokens['q']"),)),
                   [a, b], 0, ["a", "b"])  # fmt: skip


def test_union_of_different_tokenizer_types_is_refused() -> None:
    a = _vocab("a", ["a", "b"])
    b = TokenizerVocab("b", "Unigram", {"a": 0, "q": 1}, {}, 2)
    with pytest.raises(ValueError, match=r"different types \(a: BPE, b: Unigram\)"):
        plan_vocab(VocabSpec("union"), [a, b], 0, ["a", "b"])


# --------------------------------------------------------------------------- end to end


def test_t0_slerp_union_keeps_a_rows_bit_for_bit(tmp_path: Path) -> None:
    a_dir, b_dir, state_a, state_b = _pair(tmp_path)
    out = _run(
        tmp_path,
        f"models: {{a: {a_dir}, b: {b_dir}}}\nt: 0\ntokenizer_from: union\n",
    )
    merged = _read(out)
    n_a = state_a["model.embed_tokens.weight"].shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape[0] == n_a + 4
        assert torch.equal(merged[name][:n_a].view(torch.int16), state_a[name].view(torch.int16))
        # The new tokens are only in B: A takes B's rows for them, so t=0 gives B's rows.
        assert torch.equal(merged[name][n_a:], state_b[name][n_a:])
    assert torch.equal(merged["model.norm.weight"], state_a["model.norm.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == n_a + 4


def test_union_output_loads_in_transformers(tmp_path: Path) -> None:
    a_dir, b_dir, _, _ = _pair(tmp_path)
    out = _run(
        tmp_path,
        f"models: {{a: {a_dir}, b: {b_dir}}}\nt: 0.5\ntokenizer_from: union\n",
    )
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    b_tok = transformers.AutoTokenizer.from_pretrained(str(b_dir))
    ids = tok("<|im_start|>hello <tool> foo_bar<|im_end|>")["input_ids"]
    assert ids == b_tok("<|im_start|>hello <tool> foo_bar<|im_end|>")["input_ids"]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<tool>", "foo_bar"]) == [
        68, 69, 70, 71,
    ]  # fmt: skip
    assert {t.content for t in tok.added_tokens_decoder.values() if t.special} >= {
        "<|im_start|>", "<|im_end|>",
    }  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 72) and torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "| `<\\|im_start\\|>` | 68 | b |" in card


def test_n_model_union_with_tied_embeddings_and_padding(tmp_path: Path) -> None:
    a_dir, b_dir, state_a, state_b = _pair(tmp_path, tied=True)
    out = _run(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {a_dir}\n    parameters: {{weight: 1}}\n"
        f"  - model: {b_dir}\n    parameters: {{weight: 0}}\ndtype: bfloat16\n"
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n",
    )
    merged = _read(out)
    assert "lm_head.weight" not in merged  # tied stays tied
    embed = merged["model.embed_tokens.weight"]
    assert embed.shape == (72, HIDDEN)
    own = state_a["model.embed_tokens.weight"]
    assert torch.equal(embed[:68], own)  # weight 1 on A: A's rows...
    assert torch.equal(embed[68:72], state_b["model.embed_tokens.weight"][68:])  # ... B's new
    padded = _run(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {a_dir}\n    parameters: {{weight: 1}}\n"
        f"  - model: {b_dir}\n    parameters: {{weight: 0}}\ndtype: bfloat16\n"
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 32\n",
        out="padded",
    )
    embed = _read(padded)["model.embed_tokens.weight"]
    assert embed.shape == (96, HIDDEN)
    mean = embed[:72].double().mean(0).to(torch.bfloat16)
    assert torch.equal(embed[72:], mean.expand(24, HIDDEN))
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == 96


def test_named_tokenizer_and_chat_template(tmp_path: Path) -> None:
    a_dir, b_dir, state_a, _ = _pair(tmp_path)
    out = _run(
        tmp_path,
        f"merge_method: slerp\nbase_model: {a_dir}\nmodels: [{{model: {b_dir}}}]\n"
        f"parameters: {{t: 0}}\ntokenizer_source: base\nchat_template: chatml\n",
    )
    merged = _read(out)
    assert merged["lm_head.weight"].shape[0] == 68  # B's extra rows dropped: A's vocabulary
    assert torch.equal(merged["lm_head.weight"], state_a["lm_head.weight"])
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 68
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_vocabulary_errors(tmp_path: Path, capsys) -> None:
    a_dir, b_dir, _, _ = _pair(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"models: {{a: {a_dir}, b: {b_dir}}}\nt: 0.5\n")
    assert cli.main(["validate", str(recipe)]) == 2
    assert "add tokenizer_source: union" in capsys.readouterr().err
    mk = (
        f"merge_method: slerp\nbase_model: {a_dir}\nmodels: [{{model: {b_dir}}}]\n"
        "parameters: {t: 0.5}\ntokenizer:\n  source: base\n  tokens:\n"
    )
    recipe.write_text(mk + "    nope: {source: base}\n")
    assert cli.main(["validate", str(recipe)]) == 2
    assert "token 'nope' is not in the output vocabulary" in capsys.readouterr().err
    recipe.write_text(mk + "    a: {source: someone/else}\n")
    assert cli.main(["validate", str(recipe)]) == 2
    assert "'someone/else' is not base, union or one of the models" in capsys.readouterr().err
    os.remove(b_dir / "tokenizer.json")
    (b_dir / "tokenizer.model").write_bytes(b"\0")
    recipe.write_text(f"models: {{a: {a_dir}, b: {b_dir}}}\nt: 0.5\ntokenizer_from: union\n")
    assert cli.main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "SentencePiece tokenizer (tokenizer.model) but no tokenizer.json" in err
    assert len(err.strip().splitlines()) == 1


def test_plan_reports_the_vocabularies(tmp_path: Path, capsys) -> None:
    a_dir, b_dir, _, _ = _pair(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"models: {{a: {a_dir}, b: {b_dir}}}\nt: 0.5\ntokenizer_from: union\n")
    assert cli.main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "output 72 rows (72 tokens, union)" in out
    assert "4 token(s) only in model B" in out and "'<|im_start|>'" in out


@needs_mergekit
@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_union_agrees_with_mergekit(tmp_path: Path, method: str) -> None:
    a_dir, b_dir, _, _ = _pair(tmp_path)
    if method == "slerp":
        text = (
            f"merge_method: slerp\nbase_model: {a_dir}\nmodels: [{{model: {a_dir}}}, "
            f"{{model: {b_dir}}}]\nparameters: {{t: 0.4}}\ndtype: bfloat16\n"
        )
    else:
        text = (
            f"merge_method: linear\nmodels:\n  - model: {a_dir}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {b_dir}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n"
        )
    text += "tokenizer_source: union\n"
    ours = _run(tmp_path, text, out="ours")
    run_mergekit(tmp_path / "ours.yml", tmp_path / "theirs")
    mine, theirs = _read(ours), _read(tmp_path / "theirs")
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        assert tensor.shape == theirs[name].shape, name
        assert _steps(tensor, theirs[name]) <= 1, name
    their_tok = json.loads((tmp_path / "theirs" / "tokenizer.json").read_text())
    our_tok = json.loads((ours / "tokenizer.json").read_text())
    assert {t["content"]: t["id"] for t in our_tok["added_tokens"]} == {
        t["content"]: t["id"] for t in their_tok["added_tokens"]
    }


def test_our_method_format_takes_tokenizer_from(tmp_path: Path) -> None:
    a_dir, b_dir, state_a, state_b = _pair(tmp_path)
    out = _run(
        tmp_path,
        f"method: task_arithmetic\nbase: {a_dir}\nmodels:\n  chat: {{path: {b_dir}, weight: 1}}\n"
        "tokenizer_from: chat\n",
    )
    merged = _read(out)
    # B's vocabulary (A's plus 4): A's re-indexed rows are its own plus B's new rows, so
    # base + 1 * (B - A) is B wherever both are exact.
    embed = merged["model.embed_tokens.weight"]
    assert embed.shape == (72, HIDDEN)
    assert torch.equal(embed[68:], state_b["model.embed_tokens.weight"][68:])
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|im_end|>") == 69


def test_hub_union_streams_and_preflight_reads_tokenizers_first(
    tmp_path: Path, fake_hub, capsys
) -> None:
    from tests.conftest import folder_files

    a_dir, b_dir, _, _ = _pair(tmp_path)
    fake_hub.add_repo("acme/a", folder_files(a_dir))
    fake_hub.add_repo("acme/b", folder_files(b_dir))
    local = _run(tmp_path, f"models: {{a: {a_dir}, b: {b_dir}}}\nt: 0.3\ntokenizer_from: union\n")
    recipe = tmp_path / "hub.yml"
    recipe.write_text("models: {a: acme/a, b: acme/b}\nt: 0.3\ntokenizer_from: union\n")
    out = tmp_path / "from-hub"
    assert cli.main(["run", str(recipe), "--out", str(out), "--stream", "--quiet"]) == 0
    assert _read(out).keys() == _read(local).keys()
    for name, tensor in _read(out).items():
        assert torch.equal(tensor, _read(local)[name]), name
    assert (out / "tokenizer.json").read_bytes() == (local / "tokenizer.json").read_bytes()
    # A vocabulary problem on the Hub is found from the tokenizer files and headers alone.
    files = folder_files(b_dir)
    del files["tokenizer.json"]
    fake_hub.add_repo("acme/sp", {**files, "tokenizer.model": b"\0"})
    fake_hub.log.clear()
    recipe.write_text("models: {a: acme/a, b: acme/sp}\nt: 0.3\ntokenizer_from: union\n")
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    shard_gets = [r for r in fake_hub.requests("GET") if r.path.endswith(".safetensors")]
    assert shard_gets and all(r.range is not None for r in shard_gets)  # headers only
    assert not (tmp_path / "bad").exists()


def test_any_tensor_with_the_vocabulary_axis_is_reindexed_and_verify_recomputes_it(
    tmp_path: Path, capsys
) -> None:
    a_dir, b_dir, state_a, state_b = _pair(tmp_path)
    # A per-token bias under a name no list knows: found by its first axis (config vocab_size).
    for folder, state, seed in ((a_dir, state_a, 5), (b_dir, state_b, 6)):
        rows = state["lm_head.weight"].shape[0]
        bias = torch.randn(rows, generator=torch.Generator().manual_seed(seed))
        state["head.token_bias"] = bias.to(torch.bfloat16)
        for old in folder.glob("*.safetensors"):
            old.unlink()
        (folder / "model.safetensors.index.json").unlink(missing_ok=True)
        config = json.loads((folder / "config.json").read_text())
        write_checkpoint(folder, state, None, config)
    recipe = f"models: {{a: {a_dir}, b: {b_dir}}}\nt: 0\ntokenizer_from: union\n"
    out = _run(tmp_path, recipe)
    bias = _read(out)["head.token_bias"]
    assert bias.shape == (72,)
    assert torch.equal(bias[:68], state_a["head.token_bias"])
    assert torch.equal(bias[68:], state_b["head.token_bias"][68:])
    capsys.readouterr()
    assert cli.main(["verify", str(out), "--recipe", str(tmp_path / "out.yml"), "--full"]) == 0


def test_chat_template_auto_and_jinja(tmp_path: Path) -> None:
    a_dir, b_dir, _, _ = _pair(tmp_path)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    for folder in (a_dir, b_dir):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    head = f"merge_method: slerp\nbase_model: {a_dir}\nmodels: [{{model: {b_dir}}}]\n"
    head += "parameters: {t: 0.5}\ntokenizer_source: union\n"
    out = _run(tmp_path, head + "chat_template: auto\n")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "[user] hi\n"
    jinja = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    out = _run(tmp_path, head + f"chat_template: {json.dumps(jinja)}\n", out="jinja")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template(chat, tokenize=False) == "<<hi>>"


def test_mixed_trained_rows_warn() -> None:
    # <x> was reserved (plain) in a, added (and presumably trained) in b.
    a = _vocab("a", ["a", "<x>"])
    b = _vocab("b", ["a", "<x>"], added=("<x>",))
    plan = plan_vocab(VocabSpec("union"), [a, b], 0, ["a", "b"])
    assert plan.identity
    assert any("may mix a trained row with an untrained one" in w and "'<x>'" in w
               for w in plan.warnings)  # fmt: skip


def test_plain_merges_never_import_the_tokenizer_library(tmp_path: Path) -> None:
    a_dir, _, _, _ = _pair(tmp_path)
    code = (
        "import sys\nfrom shardmerge import cli\n"
        f"assert cli.main(['validate', {str(tmp_path / 'r.yml')!r}]) == 0\n"
        "assert 'tokenizers' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    (tmp_path / "r.yml").write_text(f"models: {{a: {a_dir}, b: {a_dir}}}\nt: 0.5\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_token_overrides_end_to_end(tmp_path: Path) -> None:
    a_dir, b_dir, state_a, state_b = _pair(tmp_path)
    out = _run(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {a_dir}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b_dir}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n"
        "tokenizer:\n  source: union\n  tokens:\n"
        "    a: {source: {kind: zero}, force: true}\n"  # id 3: zero in both models
        f"    b: {{source: {b_dir}, force: true}}\n"  # id 4: B's row for both
        f"    <tool>: {{source: {{kind: model_token, model: {a_dir}, token: c}}}}\n",
    )
    embed = _read(out)["model.embed_tokens.weight"]
    assert torch.equal(embed[3], torch.zeros(HIDDEN, dtype=torch.bfloat16))
    assert torch.equal(embed[4], state_b["model.embed_tokens.weight"][4])
    # <tool> (70): B has its own row, A (lacking it) takes its row of 'c' (id 5): the mean.
    expected = (
        state_a["model.embed_tokens.weight"][5].float()
        + state_b["model.embed_tokens.weight"][70].float()
    ) / 2
    assert _steps(embed[70], expected) <= 1


def test_union_cannot_follow_tokens_beyond_the_embedding() -> None:
    a = _vocab("a", ["a", "b", "c"], rows=2)  # 'c' has no embedding row
    b = _vocab("b", ["a", "b", "z"])
    with pytest.raises(ValueError, match="has 1 token\\(s\\) beyond its 2 embedding rows"):
        plan_vocab(VocabSpec("union"), [a, b], 0, ["a", "b"])
    # Its own tokenizer is fine: the extra token is left out, with a warning.
    plan = plan_vocab(VocabSpec(0), [a, b], 0, ["a", "b"])
    assert plan.real_rows == 2 and any("beyond its 2 embedding rows" in w for w in plan.warnings)


def test_a_padded_embedding_keeps_its_size_and_padding_rows() -> None:
    # Qwen2.5-style: 3 tokens, 5 rows, in both models: nothing to re-index (mergekit would
    # shrink both to 3 rows, its #425).
    a = _vocab("a", ["a", "b", "c"], rows=5)
    b = _vocab("b", ["a", "b", "c"], rows=5)
    same = plan_vocab(VocabSpec("union"), [a, b], 0, ["a", "b"])
    assert same.identity and same.rows == 5
    # A chat sibling's new token takes the first spare row; the base keeps its own padding rows.
    chat = _vocab("chat", ["a", "b", "c", "<x>"], added=("<x>",), rows=5)
    plan = plan_vocab(VocabSpec("union"), [a, chat], 0, ["a", "chat"])
    assert (plan.rows, plan.real_rows, plan.new_ids) == (5, 4, {"<x>": 3})
    assert list(plan.own[0]) == [0, 1, 2, -1, 4] and plan.fill[3] == ((1, 3),)
    assert list(plan.own[1]) == [0, 1, 2, 3, 4]
