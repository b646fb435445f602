"""Random mergekit configs, run by shardmerge and by mergekit 0.1.5, outputs compared tensor by tensor.

    .venv/bin/python benchmarks/differential.py --count 40 --seed 1
    .venv/bin/python benchmarks/differential.py --seed 7 --only 3 --keep   # replay one, keep files

A tiny Llama family (a base and three fine-tunes, 4 layers; one in bfloat16, one in float32; the
third fine-tune equal to the base in its norms, so some task vectors are zero) is made once in
the work folder. Each config draws a method from shardmerge's registry, models for it, every
parameter the method takes (numbers, gradients, filter lists; per model or as a default at the
top level), a merge dtype, sometimes an ``out_dtype`` and sometimes mergekit's ``slices:`` form.

Methods that rank magnitudes (ties, breadcrumbs, DELLA, SCE) run on the float32 family: mergekit
breaks ties among equal magnitudes arbitrarily, and bf16 deltas tie often. Random-mask methods
(DARE, DELLA) draw other masks than mergekit's, so only their names, shapes and dtypes are
compared, unless every density is 1.

Agreement: the same tensor names, shapes and dtypes, and every value within one step of the
output dtype (the gap between adjacent numbers at that magnitude; a float32 output: 2**-20
relative, mergekit's own float32 accumulations differ from ours in order; karcher, a documented
float64 approximation of mergekit's rounded iteration: one bf16 step). Arcee Fusion's and RAM+'s
float32 output (mergekit's, for any merge dtype) is rounded to ours first, as documented. A config that one
tool refuses and the other runs is a disagreement too. Exit status 1 when any config disagrees.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from shardmerge.methods import METHODS  # noqa: E402

MERGEKIT = REPO / "benchmarks" / ".venv-mergekit" / "bin" / "mergekit-yaml"
LAYERS = 4
HIDDEN, INTER, VOCAB = 16, 32, 64
RANKING = {"ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
# Documented approximations of mergekit (float64 where it rounds every step to the merge dtype):
# compared in bf16 steps whatever the dtype.
APPROXIMATE = {"karcher"}
# mergekit's result is float32 whatever the merge dtype (a float32 mask or scale promotes it) and
# it writes that, where we write the merge dtype (documented); with out_dtype both round to it.
WIDER = {"arcee_fusion", "ramplus_tl"}
# Documented: in a 16-bit merge dtype mergekit's iteration rounds every step and ours does not,
# so the two differ by more than a step (README, multislerp); reported, not counted.
ROUNDS_EVERY_STEP = {"multislerp"}
# A typical range per parameter name, where the registry gives none (or an open one).
RANGES = {
    "weight": (-0.3, 1.2),
    "t": (0.0, 1.0),
    "lambda": (0.5, 1.5),
    "scale": (0.0, 2.0),
    "epsilon": (0.0, 0.2),
    "gamma": (0.0, 0.1),
    "density": (0.1, 1.0),
    "select_topk": (0.05, 1.0),
    "max_iter": (1, 20),
    "tol": (1e-7, 1e-3),
    "eps": (1e-9, 1e-6),
    "r": (0.0, 0.5),
    "alpha": (0.0, 0.5),
}
# Near-zero results: allowance relative to the tensor's RMS (benchmarks/compare.py's rule).
CANCELLATION = 2.0**-16
# Where we refuse on purpose what mergekit runs (its output there is NaN): a clear error instead.
REFUSALS = ("mergekit writes NaNs",)
FILTERS = ("self_attn", "mlp", "input_layernorm", "embed_tokens")


def make_family(root: Path, dtype: torch.dtype) -> list[Path]:
    """A base and three fine-tunes of a tiny Llama in ``root``; returns their folders."""
    g = torch.Generator().manual_seed(5)
    base = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            base[p + f"self_attn.{proj}_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        base[p + "mlp.gate_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g)
        base[p + "mlp.up_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g)
        base[p + "mlp.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=g)
        base[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        base[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    base["model.norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    base["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    states = [base]
    for k, scale in enumerate((0.02, 0.05, 0.03)):
        tune = {}
        for name, v in base.items():
            if k == 2 and name.endswith("norm.weight"):
                tune[name] = v.clone()  # a zero task vector
            else:
                tune[name] = v + scale * (1 + k * torch.rand(()).item()) * torch.randn(
                    v.shape, generator=g
                )
        states.append(tune)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    folders = []
    for j, state in enumerate(states):
        folder = root / f"m{j}"
        folders.append(folder)
        if (folder / "tokenizer.json").exists():  # made before (deterministic): another run
            continue  # may be reading it
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.to(dtype).contiguous() for k, v in state.items()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "tokenizer.json").write_text("{}")  # last: the folder is complete
    return folders


def _number(rng: random.Random, name: str, low: float | None, high: float | None) -> float:
    lo, hi = RANGES.get(name, (0.0, 1.0))
    if low is not None:
        lo = max(lo, low)
    if high is not None:
        hi = min(hi, high)
    value = rng.uniform(lo, hi)
    if rng.random() < 0.15:  # an edge of the range
        value = rng.choice((lo, hi))
    return round(value, 3)


def _value(rng: random.Random, param, random_masks: bool) -> object:
    if param.kind == "bool":
        return rng.random() < 0.5
    if param.integer:
        return rng.randint(1, 12)
    if param.name == "density" and random_masks and rng.random() < 0.3:
        return 1.0
    form = rng.random()
    if form < 0.65:
        return _number(rng, param.name, param.low, param.high)
    if form < 0.85:
        return [_number(rng, param.name, param.low, param.high) for _ in range(rng.randint(2, 4))]
    return [
        {"filter": rng.choice(FILTERS), "value": _number(rng, param.name, param.low, param.high)},
        {"value": _number(rng, param.name, param.low, param.high)},
    ]


def random_config(rng: random.Random, families: dict[str, list[Path]]) -> dict:
    method_name = rng.choice(sorted(METHODS))
    spec = METHODS[method_name]
    family = "float32" if method_name in RANKING else rng.choice(["bfloat16", "float32"])
    folders = families[family]
    base = folders[0]
    tunes = folders[1:]
    if family == "bfloat16" and rng.random() < 0.2:
        base = families["float32"][0]  # inputs of mixed precision
    high = len(tunes) if spec.max_models is None else min(spec.max_models, len(tunes))
    count = rng.randint(max(spec.min_models, 1), max(high, 1))
    chosen = rng.sample(tunes, count)
    use_base = spec.base == "required" or (spec.base == "optional" and rng.random() < 0.5)
    if method_name == "passthrough":
        use_base = False
    elif spec.base == "none" and rng.random() < 0.25:
        use_base = True  # mergekit accepts a base_model for any method
    cfg: dict = {"merge_method": method_name}
    models = [{"model": str(m)} for m in chosen]
    if method_name in ("slerp", "nearswap"):
        models = [{"model": str(base)}, {"model": str(chosen[0])}]
    elif method_name == "passthrough":
        models = [{"model": str(chosen[0])}]
    shared: dict = {}
    per_model = [p for p in spec.params if p.per_model]
    for param in spec.params:
        if param.per_model:
            continue
        if param.default is None or rng.random() < 0.6:
            shared[param.name] = _value(rng, param, method_name in RANDOM)
    for entry in models:
        if method_name in ("slerp", "nearswap") and entry["model"] == str(base):
            continue
        params = {}
        for param in per_model:
            if param.default is None or rng.random() < 0.6:
                params[param.name] = _value(rng, param, method_name in RANDOM)
        if params:
            entry["parameters"] = params
    # mergekit reads a per-model parameter given at the top level as every model's default.
    for param in per_model:
        if rng.random() < 0.2:
            shared.setdefault(param.name, _value(rng, param, method_name in RANDOM))
    if spec.check is not None:  # DELLA: density +- epsilon within (0, 1); retry instead
        for entry in models:
            values = {**shared, **entry.get("parameters", {})}
            flat = {k: v for k, v in values.items() if isinstance(v, (int, float))}
            if flat and spec.check(flat) is not None:
                return random_config(rng, families)
    if shared:
        cfg["parameters"] = shared
    if use_base:
        cfg["base_model"] = str(base)
    if method_name == "passthrough" and rng.random() < 0.7:
        a, b = rng.sample(tunes, 2)
        cut = rng.randint(1, LAYERS - 1)
        cfg["slices"] = [
            {"sources": [{"model": str(a), "layer_range": [0, cut]}]},
            {"sources": [{"model": str(b), "layer_range": [rng.randint(0, cut), LAYERS]}]},
        ]
    elif method_name != "passthrough" and rng.random() < 0.3:
        # One slice, or two whose sources take different layers (a frankenmerge).
        cfg["slices"] = []
        for _ in range(rng.randint(1, 2)):
            length = rng.randint(1, LAYERS - 1)
            sources = []
            entries = list(models)
            if use_base and all(m["model"] != str(base) for m in models):
                entries.append({"model": str(base)})
            for m in entries:
                start = rng.randint(0, LAYERS - length)
                sources.append({**m, "layer_range": [start, start + length]})
            cfg["slices"].append({"sources": sources})
    else:
        cfg["models"] = models
    dtype = rng.choice(["bfloat16", "float16", "float32", None])
    if method_name in RANKING:
        dtype = "float32"
    if dtype is not None:
        cfg["dtype"] = dtype
    if rng.random() < 0.15:
        cfg["out_dtype"] = rng.choice(["bfloat16", "float16", "float32"])
    return cfg


def read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = f.get_tensor(name)
    return out


def steps_apart(a: torch.Tensor, b: torch.Tensor, coarse: bool = False) -> float:
    """The largest |a - b| in allowances: one step of their dtype at the larger magnitude, or
    ``CANCELLATION`` times the tensor's RMS where that is more (a result near zero, where two
    tools' float32 sums in other orders differ by more than its own step). NaN = NaN.
    ``coarse``: steps of bfloat16 whatever the dtype (the issue's bar for approximations)."""
    x, y = a.double(), b.double()
    both_nan = x.isnan() & y.isnan()
    same_inf = x.isinf() & (x == y)
    diff = (x - y).abs()
    mag = torch.maximum(x.abs(), y.abs())
    if coarse:
        mag = mag.clamp_min(torch.finfo(torch.bfloat16).smallest_normal)
        step = torch.exp2(torch.floor(torch.log2(mag)) - _mantissa_bits(torch.bfloat16))
    elif a.dtype == torch.float32:
        step = mag * 2.0**-20
    else:
        mag = mag.clamp_min(torch.finfo(a.dtype).smallest_normal)
        step = torch.exp2(torch.floor(torch.log2(mag)) - _mantissa_bits(a.dtype))
    finite = y[y.isfinite()]
    rms = float(finite.square().mean().sqrt()) if finite.numel() else 0.0
    step = step.clamp_min(max(CANCELLATION * rms, 2.0**-140))
    ratio = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff / step)
    ratio = torch.nan_to_num(ratio, nan=float("inf"))
    return float(ratio.max()) if ratio.numel() else 0.0


def _mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]


def run_one(cfg: dict, work: Path) -> tuple[str, str]:
    """(verdict, detail): verdict "agree", "differ", "differ as documented" (mergekit's NaNs
    where ours are finite; multislerp's 16-bit rounding), "both refuse", "refused (documented)"
    or "one refuses"."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    recipe = work / "config.yml"
    recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ours = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardmerge",
            "run",
            str(recipe),
            "--out",
            str(work / "ours"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    theirs = subprocess.run(
        [str(MERGEKIT), str(recipe), str(work / "theirs")],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    if ours.returncode and any(reason in ours.stderr for reason in REFUSALS):
        return "refused (documented)", ours.stderr.strip().splitlines()[-1]
    if ours.returncode and theirs.returncode:
        return "both refuse", ours.stderr.strip().splitlines()[-1] if ours.stderr else ""
    if ours.returncode or theirs.returncode:
        who = "shardmerge" if ours.returncode else "mergekit"
        err = (ours if ours.returncode else theirs).stderr.strip().splitlines()
        return "one refuses", f"{who} refused: {err[-1] if err else '?'}"
    a, b = read(work / "ours"), read(work / "theirs")
    problems = []
    if set(a) != set(b):
        problems.append(
            f"names: ours only {sorted(set(a) - set(b))[:4]}, theirs only {sorted(set(b) - set(a))[:4]}"
        )
    compare_values = cfg["merge_method"] not in RANDOM or _all_dense(cfg)
    worst = (0.0, "")
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if cfg["merge_method"] in WIDER and "out_dtype" not in cfg and y.dtype == torch.float32:
            y = y.to(x.dtype)  # mergekit's float32 result, written as it is (README: documented)
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(
                f"{name}: ours {tuple(x.shape)} {x.dtype}, theirs {tuple(y.shape)} {y.dtype}"
            )
            continue
        if compare_values and x.is_floating_point():
            s = steps_apart(x, y, coarse=cfg["merge_method"] in APPROXIMATE)
            if s > worst[0]:
                worst = (s, name)
    their_nans = [n for n in sorted(set(a) & set(b)) if _only_theirs_nan(a[n], b[n])]
    if their_nans and not problems:
        return (
            "differ as documented",
            f"mergekit writes NaNs in {len(their_nans)} tensors, ours are finite",
        )
    if worst[0] > 1 and not problems and _documented_rounding(cfg):
        return (
            "differ as documented",
            f"{worst[1]} {worst[0]:.3g} steps apart (mergekit rounds every step in 16 bits)",
        )
    if worst[0] > 1:
        problems.append(f"values: {worst[1]} {worst[0]:.3g} steps apart")
    for file in ("config.json",):
        ca = json.loads((work / "ours" / file).read_text())
        cb = json.loads((work / "theirs" / file).read_text())
        # transformers 5 (mergekit's) writes "dtype"; older versions, and we, "torch_dtype".
        for key in ("num_hidden_layers", "dtype"):
            mine = ca.get(key, ca.get("torch_" + key))
            other = cb.get(key, cb.get("torch_" + key))
            if mine != other:
                problems.append(f"{file} {key}: ours {mine}, theirs {other}")
    if problems:
        return "differ", "; ".join(problems)
    return "agree", f"max {worst[0]:.2g} steps" + (
        "" if compare_values else " (masks not compared)"
    )


def _only_theirs_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.is_floating_point() and bool(y.isnan().any()) and not bool(x.isnan().any())


def _documented_rounding(cfg: dict) -> bool:
    """multislerp in a 16-bit dtype: mergekit rounds its unit vectors, mean and tangent to the
    merge dtype at every step, ours is float64 until one rounding (README: multislerp)."""
    return cfg["merge_method"] in ROUNDS_EVERY_STEP and cfg.get("dtype") != "float32"


def _all_dense(cfg: dict) -> bool:
    text = yaml.safe_dump(cfg)
    return "density" in text and all(v == 1.0 for v in _densities(cfg))


def _densities(node: object) -> list[object]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "density":
                found.append(v)
            else:
                found.extend(_densities(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_densities(v))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, help="run only config number N of the seed's series")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".data" / "differential")
    parser.add_argument("--keep", action="store_true", help="keep each config's outputs")
    args = parser.parse_args(argv)
    if not MERGEKIT.exists():
        print(
            f"mergekit not installed ({MERGEKIT}): run benchmarks/setup_mergekit.sh",
            file=sys.stderr,
        )
        return 2
    families = {
        "bfloat16": make_family(args.work / "family-bf16", torch.bfloat16),
        "float32": make_family(args.work / "family-f32", torch.float32),
    }
    rng = random.Random(args.seed)
    configs = [random_config(rng, families) for _ in range(args.count)]
    bad = 0
    for i, cfg in enumerate(configs):
        if args.only is not None and i != args.only:
            continue
        started = time.perf_counter()
        verdict, detail = run_one(cfg, args.work / f"run-{i}")
        seconds = time.perf_counter() - started
        print(f"[{i}] {cfg['merge_method']}: {verdict} ({seconds:.1f} s) {detail}", flush=True)
        if verdict in ("differ", "one refuses"):
            bad += 1
            print(yaml.safe_dump(cfg, sort_keys=False), flush=True)
        elif not args.keep:
            shutil.rmtree(args.work / f"run-{i}")
    print(f"{bad} of {len(configs) if args.only is None else 1} configs disagree")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
