"""Peak memory of a union merge with a large vocabulary, against the same merge of one vocabulary.

    python benchmarks/vocab_union.py WORKDIR [--vocab 150000] [--hidden 2048]

Writes model A (a BPE tokenizer of ``--vocab`` tokens; embeddings and lm_head of vocab x hidden
in bf16, two small layers) and B (A's tokens plus 4 added ones, A's rows moved a little), then
measures (benchmarks/measure.py, a fresh process each) ``shardmerge run`` of
- same: A with a copy of A's vocabulary (nothing re-indexed), t = 0.5;
- union: A and B with ``tokenizer_from: union`` (every vocabulary tensor re-indexed as it streams).
Prints one JSON line per run: wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent


def _tokenizer(folder: Path, vocab: int, added: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    tokens = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.BPE(vocab=tokens, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    for content in added:
        fast.add_tokens(AddedToken(content, special=True), special_tokens=True)
    fast.save_pretrained(str(folder))


def _model(folder: Path, rows: int, hidden: int, seed: int, base: dict | None) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        value = torch.randn(rows, hidden, generator=g, dtype=torch.float32).to(torch.bfloat16)
        if base is not None:
            value[: base[name].shape[0]] = base[name]
        state[name] = value
    for i in range(2):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(hidden, hidden, generator=g).to(
            torch.bfloat16
        )
    state["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "llama", "vocab_size": rows, "hidden_size": hidden,
              "num_hidden_layers": 2, "tie_word_embeddings": False}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return state


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    a, same, b = work / "a", work / "same", work / "b"
    for folder in (a, same, b):
        folder.mkdir(parents=True)
    _tokenizer(a, args.vocab, [])
    _tokenizer(same, args.vocab, [])
    _tokenizer(b, args.vocab, ["<|im_start|>", "<|im_end|>", "<tool>", "</tool>"])
    state_a = _model(a, args.vocab, args.hidden, 1, None)
    _model(same, args.vocab, args.hidden, 2, None)
    _model(b, args.vocab + 4, args.hidden, 3, state_a)
    del state_a
    for name, other, extra in (("same", same, ""), ("union", b, "tokenizer_from: union\n")):
        recipe = work / f"{name}.yml"
        recipe.write_text(f"models: {{a: {a}, b: {other}}}\nt: 0.5\n{extra}")
        result = work / f"{name}.json"
        command = [sys.executable, "-m", "shardmerge", "run", str(recipe), "--out",
                   str(work / f"out-{name}"), "--quiet"]  # fmt: skip
        subprocess.run([sys.executable, str(HERE / "measure.py"), str(result), "--", *command],
                       check=True)  # fmt: skip
        measured = json.loads(result.read_text())
        print(json.dumps({"run": name, "vocab": args.vocab, "hidden": args.hidden, **measured}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
