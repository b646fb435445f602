"""Generate a pair of correlated random Llama checkpoints (bf16 sharded safetensors) to merge.

Model B = A + noise, like two fine-tunes of one base. Tensors are generated in row blocks and
streamed into hand-written safetensors shards (header first, data after), so memory stays at a
few hundred MB whatever the model or shard size.

    python benchmarks/make_pair.py --preset medium        # -> benchmarks/.data/medium/{a,b}
    python benchmarks/make_pair.py --preset tiny --out /tmp/pair
    python benchmarks/make_pair.py --hidden 512 --intermediate 1376 --layers 4 --vocab 8000 \\
        --heads 8 --kv-heads 2 --shard-size-a 20MB --shard-size-b 30MB --out /tmp/custom
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / ".data"
MANIFEST = "pair.json"
# Bumped when the files written change, so an old pair is regenerated rather than reused.
FORMAT_VERSION = 1
# Llama's initializer_range: the std of every linear and embedding weight.
WEIGHT_STD = 0.02
# RMSNorm weights are drawn around 1 with this spread, so they are not all equal.
NORM_STD = 0.05
# Elements generated at a time: 16 Mi float32 = 64 MiB per buffer.
BLOCK_NUMEL = 1 << 24
BF16_BYTES = 2


@dataclass(frozen=True)
class PairSpec:
    """Shapes, shard sizes and randomness of one generated pair."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    shard_size_a_bytes: int
    shard_size_b_bytes: int
    seed: int = 0
    # std of B - A relative to A's std; 0.1 gives cos(A, B) ~ 0.995, so SLERP takes its
    # trigonometric branch rather than the near-parallel lerp fallback (|cos| > 0.9995).
    noise: float = 0.1


PRESETS = {
    # A few MB: smoke tests of the whole pipeline.
    "tiny": PairSpec(
        hidden=256,
        intermediate=688,
        layers=4,
        vocab=1024,
        heads=8,
        kv_heads=2,
        shard_size_a_bytes=2_000_000,
        shard_size_b_bytes=3_000_000,
    ),
    # TinyLlama-like, ~1.3 GB per model.
    "medium": PairSpec(
        hidden=2048,
        intermediate=5632,
        layers=12,
        vocab=32000,
        heads=32,
        kv_heads=4,
        shard_size_a_bytes=300_000_000,
        shard_size_b_bytes=450_000_000,
    ),
    # Llama-3-8B widths with 4 layers: a 1.05 GB embedding, a 1.05 GB lm_head, ~3.85 GB total.
    "wide": PairSpec(
        hidden=4096,
        intermediate=14336,
        layers=4,
        vocab=128256,
        heads=32,
        kv_heads=8,
        shard_size_a_bytes=5_000_000_000,
        shard_size_b_bytes=5_000_000_000,
    ),
    # Llama-2-7B's shapes at full depth, 13.5 GB per model: inputs that do not fit in the page
    # cache of a 24 GiB machine (run.py --cold). A in ~5 GB shards, B in ~10 GB shards.
    "7b": PairSpec(
        hidden=4096,
        intermediate=11008,
        layers=32,
        vocab=32000,
        heads=32,
        kv_heads=32,
        shard_size_a_bytes=5_000_000_000,
        shard_size_b_bytes=10_000_000_000,
    ),
}


def parse_size_bytes(text: str) -> int:
    """Parse '300MB', '5GB', '2GiB' or a plain byte count (MB/GB are decimal, as in HF)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10}
    units |= {"MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 300MB, 5GB or 1024)")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def tensor_shapes(spec: PairSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM state dict, in transformers' order."""
    head_dim = spec.hidden // spec.heads
    kv_dim = spec.kv_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (spec.vocab, spec.hidden))
    ]
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (spec.hidden, spec.hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, spec.hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, spec.hidden)),
            (f"{p}.self_attn.o_proj.weight", (spec.hidden, spec.hidden)),
            (f"{p}.mlp.gate_proj.weight", (spec.intermediate, spec.hidden)),
            (f"{p}.mlp.up_proj.weight", (spec.intermediate, spec.hidden)),
            (f"{p}.mlp.down_proj.weight", (spec.hidden, spec.intermediate)),
            (f"{p}.input_layernorm.weight", (spec.hidden,)),
            (f"{p}.post_attention_layernorm.weight", (spec.hidden,)),
        ]
    shapes += [("model.norm.weight", (spec.hidden,)), ("lm_head.weight", (spec.vocab, spec.hidden))]
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(
    shapes: list[tuple[str, tuple[int, ...]]], shard_size_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors greedily, in order, into shards of at most shard_size_bytes (as HF does).

    A tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        size = _numel(shape) * BF16_BYTES
        if shards[-1] and used + size > shard_size_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


class ShardWriter:
    """Writes one safetensors file whose tensors are known up front, data streamed in order."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...]]]):
        self.path = path
        self.tmp_path = path.with_name(path.name + ".tmp")
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in tensors:
            size = _numel(shape) * BF16_BYTES
            offsets = [offset, offset + size]
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": offsets}
            offset += size
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in finish()
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)
        self.written = 0

    def write(self, block: torch.Tensor) -> None:
        data = block.contiguous().view(torch.int16).numpy()  # raw bf16 bits, little-endian
        self.file.write(memoryview(data).cast("B"))
        self.written += data.nbytes

    def finish(self) -> None:
        if self.written != self.data_bytes:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.data_bytes} bytes")
        self.file.close()
        os.replace(self.tmp_path, self.path)


class ModelWriter:
    """Streams one model's tensors, in order, across its planned shards."""

    def __init__(self, out_dir: Path, shards: list[list[tuple[str, tuple[int, ...]]]]):
        self.out_dir = out_dir
        self.shards = shards
        self.names = [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
        self.weight_map = {name: self.names[i] for i, s in enumerate(shards) for name, _ in s}
        self.total_size = sum(_numel(shape) * BF16_BYTES for s in shards for _, shape in s)
        self._index = -1
        self._left: list[str] = []
        self._writer: ShardWriter | None = None

    def begin_tensor(self, name: str) -> None:
        if not self._left:
            if self._writer is not None:
                self._writer.finish()
            self._index += 1
            shard = self.shards[self._index]
            self._writer = ShardWriter(self.out_dir / self.names[self._index], shard)
            self._left = [n for n, _ in shard]
        expected = self._left.pop(0)
        if name != expected:
            raise RuntimeError(f"tensor order: got {name}, expected {expected}")

    def write(self, block: torch.Tensor) -> None:
        assert self._writer is not None
        self._writer.write(block)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.finish()
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        # The index is written last: a folder with an index is a complete checkpoint.
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def llama_config(spec: PairSpec) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.hidden // spec.heads,
        "vocab_size": spec.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": WEIGHT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "use_cache": True,
    }


def tokenizer_files(vocab: int) -> dict[str, object]:
    """A word-level tokenizer with one token per embedding row: small and loadable offline."""
    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(len(specials), vocab)]
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in enumerate(specials)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {w: i for i, w in enumerate(words)},
            "unk_token": "<unk>",
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def _tensor_seed(seed: int, index: int, model: int) -> int:
    # One stream per (tensor, model): a tensor's values do not depend on the shard layout.
    return (seed * 1_000_003 + index * 2 + model) % (2**63)


def write_pair(spec: PairSpec, out_dir: Path) -> None:
    """Write out_dir/a and out_dir/b (shards, index, config, tokenizer) and out_dir/pair.json."""
    shapes = tensor_shapes(spec)
    dirs = {"a": out_dir / "a", "b": out_dir / "b"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("model*.safetensors*"):
            stale.unlink()
    writers = {
        "a": ModelWriter(dirs["a"], plan_shards(shapes, spec.shard_size_a_bytes)),
        "b": ModelWriter(dirs["b"], plan_shards(shapes, spec.shard_size_b_bytes)),
    }
    for index, (name, shape) in enumerate(shapes):
        gen_a = torch.Generator().manual_seed(_tensor_seed(spec.seed, index, 0))
        gen_b = torch.Generator().manual_seed(_tensor_seed(spec.seed, index, 1))
        is_norm = len(shape) == 1
        std = NORM_STD if is_norm else WEIGHT_STD
        for w in writers.values():
            w.begin_tensor(name)
        cols = shape[-1] if len(shape) == 2 else shape[0]
        rows = shape[0] if len(shape) == 2 else 1
        block_rows = max(1, BLOCK_NUMEL // cols)
        for start in range(0, rows, block_rows):
            n = min(block_rows, rows - start)
            a = torch.randn(n, cols, generator=gen_a).mul_(std)
            if is_norm:
                a.add_(1.0)
            b = torch.randn(n, cols, generator=gen_b).mul_(std * spec.noise).add_(a)
            writers["a"].write(a.to(torch.bfloat16))
            writers["b"].write(b.to(torch.bfloat16))
            del a, b
        if index % 10 == 0 or index == len(shapes) - 1:
            print(f"  {index + 1}/{len(shapes)} tensors", file=sys.stderr)
    for model, w in writers.items():
        w.finish()
        d = dirs[model]
        (d / "config.json").write_text(json.dumps(llama_config(spec), indent=2))
        for file_name, content in tokenizer_files(spec.vocab).items():
            (d / file_name).write_text(json.dumps(content, indent=1))
    manifest = {"format_version": FORMAT_VERSION, "spec": asdict(spec)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


def pair_is_current(spec: PairSpec, out_dir: Path) -> bool:
    """True if out_dir already holds the pair that spec describes."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest != {"format_version": FORMAT_VERSION, "spec": asdict(spec)}:
        return False
    return all((out_dir / m / "model.safetensors.index.json").is_file() for m in ("a", "b"))


def ensure_pair(spec: PairSpec, out_dir: Path, *, force: bool = False) -> bool:
    """Generate the pair unless it is already there; returns True if it was generated."""
    if not force and pair_is_current(spec, out_dir):
        return False
    (out_dir / MANIFEST).unlink(missing_ok=True)
    model_bytes = sum(_numel(s) for _, s in tensor_shapes(spec)) * BF16_BYTES
    print(f"generating {out_dir} ({model_bytes / 1e9:.2f} GB per model, 2 models)", file=sys.stderr)
    write_pair(spec, out_dir)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, help="output folder (default .data/PRESET)")
    for flag in ("hidden", "intermediate", "layers", "vocab", "heads", "kv-heads", "seed"):
        parser.add_argument(f"--{flag}", type=int, help="overrides the preset")
    parser.add_argument("--noise", type=float, help="std of B-A relative to A's (default 0.1)")
    parser.add_argument("--shard-size-a", type=parse_size_bytes, help="e.g. 300MB")
    parser.add_argument("--shard-size-b", type=parse_size_bytes, help="e.g. 450MB")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser


def spec_from_args(args: argparse.Namespace) -> PairSpec:
    overrides = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "vocab": args.vocab,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "seed": args.seed,
        "noise": args.noise,
        "shard_size_a_bytes": args.shard_size_a,
        "shard_size_b_bytes": args.shard_size_b,
    }
    spec = replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise SystemExit("make_pair: --hidden must divide by --heads, --heads by --kv-heads")
    return spec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = spec_from_args(args)
    out_dir = args.out or DATA_DIR / args.preset
    if not ensure_pair(spec, out_dir, force=args.force):
        print(f"{out_dir} is up to date (--force to regenerate)", file=sys.stderr)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
