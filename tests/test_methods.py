"""Every merge method against a small dense reference written here, chunk-size invariance of the
streamed result, and (where benchmarks/.venv-mergekit exists) agreement with mergekit 0.1.5."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardmerge import cli, passes
from shardmerge.methods import TensorJob, bits, rng, select, sums, task_vectors
from shardmerge.methods.select import magnitude_keys
from tests.conftest import needs_mergekit, run_mergekit, write_checkpoint

# --------------------------------------------------------------------------- dense references
# Whole tensors in memory, written from the method descriptions (mergekit's semantics and our
# documented tie rule), independently of the streaming code.


def _dense_top(delta: torch.Tensor, m: int) -> torch.Tensor:
    """Mask of the m largest |delta|; ties broken by the lower flat index (stable sort)."""
    keys = magnitude_keys(delta.reshape(-1)).to(torch.int64)
    order = torch.sort(-keys, stable=True).indices  # descending key, ascending index
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[: max(0, m)]] = True
    return mask


def _dense_sparsify(kind, delta, density, gamma, rescale, key, epsilon=0.15, row=0):
    row = row or delta.numel()
    delta = delta.reshape(-1)
    n = delta.numel()
    if kind is None or density >= 1:
        return delta
    if kind == "magnitude":
        if density <= 0:
            return torch.zeros_like(delta)
        mask = _dense_top(delta, max(1, int(density * n)))
        work = delta
    elif kind == "magnitude_outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bottom = max(0, n - target - n_top)
        top = n - n_bottom - target
        mask = _dense_top(delta, top + target) & ~_dense_top(delta, top)
        work = delta
    elif kind == "della":
        work = delta.to(torch.float32) if delta.dtype == torch.float16 else delta
        rows = delta.view(-1, row)
        order = torch.sort(rows.abs(), dim=1, stable=True).indices
        ranks = order.argsort(dim=1).to(work.dtype) + 1  # a permutation's inverse: exact
        low, high = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
        probs = (density - epsilon) + rank_norm * 2 * epsilon
        u = rng.uniform_bits(key, 0, n, delta.device).to(torch.float32)
        mask = u < probs.reshape(-1).to(torch.float32) * float(1 << rng.UNIT_BITS)
    else:
        mask = rng.keep_mask(key, 0, n, density, delta.device)
        work = delta.to(torch.float32) if delta.dtype == torch.float16 else delta
    masked = work * mask.to(work.dtype)
    if rescale:
        before = work.to(torch.float64).abs().sum().to(work.dtype)
        after = masked.to(torch.float64).abs().sum().to(work.dtype)
        if not (before < 1e-7 or after < 1e-7):
            masked = masked * (before / after)
    return masked.to(delta.dtype)


FAMILIES = {
    # name: (sparsify, sign election, normalize default, rescale default)
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}


def dense_task_vectors(
    method, base, models, weights, densities, gammas, shared, name, seed, epsilons=None
):
    kind, consensus, normalize, rescale = FAMILIES[method]
    normalize = shared.get("normalize", normalize)
    rescale = shared.get("rescale", rescale)
    lam = shared.get("lambda", 1.0)
    deltas = []
    for i, x in enumerate(models):
        key = rng.stream_key(seed, name, i)
        eps = 0.15 if epsilons is None else epsilons[i]
        row = base.shape[-1] if base.dim() >= 2 else base.numel()
        delta = _dense_sparsify(kind, x - base, densities[i], gammas[i], rescale, key, eps, row)
        deltas.append(delta)
    stacked = torch.stack([d.reshape(-1) for d in deltas])
    w = torch.tensor(weights, dtype=stacked.dtype).unsqueeze(-1)
    stacked = stacked * w
    if consensus:
        elected = torch.where(stacked.sum(0) >= 0, 1, -1).to(stacked.dtype)
        take = stacked.sign() == elected
        mixed = (stacked * take).sum(0)
        divisor = (w * take).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base.reshape(-1) + mixed).to(base.dtype).reshape(base.shape)


def dense_linear(models, weights, normalize=True):
    acc = torch.zeros(models[0].shape, dtype=torch.float32)
    for x, w in zip(models, weights, strict=True):  # mergekit's fused multiply-add, in order
        acc.addcmul_(x, torch.tensor(w, dtype=torch.float32))
    if normalize:
        acc = acc / torch.tensor(weights, dtype=torch.float32).sum()
    return acc.to(models[0].dtype)


# --------------------------------------------------------------------------- tensor level


def _job(name, numel, dtype, weights, densities, gammas=None, shared=None, seed=0):
    params = []
    for i, w in enumerate(weights):
        p = {"weight": w, "density": densities[i]}
        if gammas is not None:
            p["gamma"] = gammas[i]
        params.append(p)
    full = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
    full.update(shared or {})
    return TensorJob(name, numel, dtype, tuple(params), full, seed)


def _inputs(dtype, n=10_000, k=3, ties=False):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype) for _ in range(k)]
    if ties:  # many equal magnitudes: the tie rule decides
        models[0] = (base.float() + 0.01 * torch.randint(-3, 4, (n,), generator=g)).to(dtype)
    return base, models


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", [m for m in FAMILIES if not m.startswith("della")])
def test_task_vector_methods_match_the_dense_reference_at_any_chunk_size(method, dtype):
    base, models = _inputs(dtype, ties=True)
    weights, densities, gammas = [0.6, -0.3, 1.1], [0.35, 0.7, 1.0], [0.02, 0.0, 0.1]
    kind, _, normalize, rescale = FAMILIES[method]
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 0.9}
    job = _job("layers.0.w", base.numel(), dtype, weights, densities, gammas, shared, seed=5)
    expected = dense_task_vectors(
        method, base, models, weights, densities, gammas, shared, "layers.0.w", 5
    )
    for chunk in (1024, 3072, 1 << 20):
        got = passes.merge_tensor(job, method, [base, *models], chunk)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (method, chunk)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_rescale_and_density_edges(method):
    base, models = _inputs(torch.bfloat16, n=5000, k=2)
    for densities in ([0.0, 1.0], [1e-9, 0.999], [0.5, 0.5]):
        shared = {"normalize": True, "rescale": True, "lambda": 1.0}
        job = _job("x", base.numel(), torch.bfloat16, [1.0, 0.5], densities, [0.01, 0.2], shared)
        expected = dense_task_vectors(
            method, base, models, [1.0, 0.5], densities, [0.01, 0.2], shared, "x", 0
        )
        got = passes.merge_tensor(job, method, [base, *models], 1024)
        assert torch.equal(got, expected), densities


def test_magnitude_keeps_exactly_k_with_the_first_ties_in_flat_order():
    # 10 equal magnitudes, density 0.35 of 10 -> k = 3: the first three (by index) are kept.
    base = torch.zeros(10, dtype=torch.bfloat16)
    model = torch.full((10,), 0.5, dtype=torch.bfloat16) * torch.tensor([1, -1] * 5)
    job = _job("t", 10, torch.bfloat16, [1.0], [0.35], shared={"normalize": False})
    got = passes.merge_tensor(job, "ties", [base, model.to(torch.bfloat16)], 1024)
    assert got.tolist() == [0.5, -0.5, 0.5] + [0.0] * 7


def test_float32_radix_selection_is_exact():
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(20_000)
    model = torch.randn(20_000, generator=g)
    model[::7] = model[3]  # ties across buckets of the second digit
    for density in (0.01, 0.3, 0.9999):
        job = _job("f", 20_000, torch.float32, [1.0], [density])
        got = passes.merge_tensor(job, "ties", [base, model], 1024)
        keep = _dense_top(model, max(1, int(density * 20_000)))
        assert torch.equal(got, torch.where(keep, model, torch.zeros(()))), density


def test_linear_matches_the_dense_reference():
    base, models = _inputs(torch.bfloat16)
    weights = [0.2, 0.5, 0.7]
    job = TensorJob(
        "w",
        base.numel(),
        torch.bfloat16,
        tuple({"weight": w} for w in weights),
        {"normalize": True},
        0,
    )
    got = passes.merge_tensor(job, "linear", models, 1024)
    assert torch.equal(got, dense_linear(models, weights))


def test_dare_masks_are_a_pure_function_of_seed_name_and_position():
    a = rng.keep_mask(rng.stream_key(1, "x", 0), 0, 100_000, 0.3, torch.device("cpu"))
    parts = [
        rng.keep_mask(rng.stream_key(1, "x", 0), s, min(777, 100_000 - s), 0.3, torch.device("cpu"))
        for s in range(0, 100_000, 777)
    ]
    assert torch.equal(a, torch.cat(parts))
    assert abs(a.float().mean().item() - 0.3) < 0.01
    other_name = rng.keep_mask(rng.stream_key(1, "y", 0), 0, 100_000, 0.3, torch.device("cpu"))
    other_seed = rng.keep_mask(rng.stream_key(2, "x", 0), 0, 100_000, 0.3, torch.device("cpu"))
    assert (a != other_name).float().mean() > 0.3 and (a != other_seed).float().mean() > 0.3


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.3, 0.5, 0.999, 1.0])
def test_int16_dare_masks_equal_the_bool_masks(p):
    key = rng.stream_key(3, "x", 1)
    cpu = torch.device("cpu")
    for start, count in ((0, 100_000), (12_345, 777), (2**32 - 1000, 1000)):
        want = rng.keep_mask(key, start, count, p, cpu)
        got = rng.keep_bits(key, start, count, p, cpu)
        assert got.dtype == torch.int16 and torch.equal(got, bits.from_bool(want)), (p, start)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_part_sums_are_float32_sums_rounded_once(dtype):
    """sum_rounded's shortcut for two 16-bit parts (torch's own add) against the float32
    accumulation it stands for: every bit pattern against shuffled ones, and near-cancellation."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1 << 16, generator=g)
    pairs = [(every, every[torch.randperm(every.numel(), generator=g)]) for _ in range(8)]
    pairs.append((x.to(dtype), (-x + 1e-3 * torch.randn(x.shape, generator=g)).to(dtype)))
    for a, b in pairs:
        want = (a.float() + b.float()).to(dtype)
        got = sums.sum_rounded([a, b], dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    one = x.to(dtype)
    alone = sums.sum_rounded([one], dtype)
    assert torch.equal(alone, one) and alone.data_ptr() != one.data_ptr()  # a copy: callers edit it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("row", [1, 7, 2048])
def test_row_ranks_are_a_stable_argsort_of_magnitudes(dtype, row):
    g = torch.Generator().manual_seed(row)
    x = torch.randn(row * 64, generator=g).to(dtype)
    if dtype in (torch.bfloat16, torch.float16):  # every bit pattern: NaNs, infinities, +-0
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        x = torch.cat([x, every[torch.randperm(every.numel(), generator=g)][: row * 32]])
    else:
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0])
        x[: specials.numel() * 2] = specials.repeat(2).to(dtype)
    x = torch.cat([x, torch.full((row,), 0.5, dtype=dtype)])  # a row of ties
    rows = x.view(-1, row)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    want = torch.empty_like(order).scatter_(1, order, torch.arange(row).expand_as(order))
    assert torch.equal(select.row_ranks(x, row), want)


# --------------------------------------------------------------------------- through the CLI

LAYERS = 3


def _family(
    root: Path, dtype=torch.bfloat16, llama: bool = False, tunes: int = 2
) -> tuple[list[Path], list[dict]]:
    """A base and ``tunes`` fine-tunes; ``llama``: every tensor of a (tiny) Llama, for mergekit."""
    g = torch.Generator().manual_seed(11)
    base = {"model.embed_tokens.weight": torch.randn(300, 16, generator=g)}  # > 1 tiny chunk
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        base[prefix + "self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g)
        base[prefix + "mlp.up_proj.weight"] = torch.randn(32, 16, generator=g)
        if llama:
            for proj in ("k", "v", "o"):
                base[prefix + f"self_attn.{proj}_proj.weight"] = torch.randn(16, 16, generator=g)
            base[prefix + "mlp.gate_proj.weight"] = torch.randn(32, 16, generator=g)
            base[prefix + "mlp.down_proj.weight"] = torch.randn(16, 32, generator=g)
            base[prefix + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(16, generator=g)
            base[prefix + "post_attention_layernorm.weight"] = torch.ones(16)
    base["model.norm.weight"] = torch.randn(16, generator=g)
    base["lm_head.weight"] = torch.randn(300, 16, generator=g)
    if not llama:
        base["bn.num_batches_tracked"] = torch.tensor(3, dtype=torch.int64)
    states = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}]
    for j in range(tunes):
        states.append(
            {
                k: (v + 0.02 * torch.randn(v.shape, generator=g)).to(dtype)
                if v.is_floating_point()
                else v + j + 1
                for k, v in base.items()
            }
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    folders = []
    names = list(base)
    for j, state in enumerate(states):
        shards = [names[:4], names[4:]] if j == 1 else None  # sharded differently
        folder = write_checkpoint(root / f"m{j}", state, shards, config, {"tokenizer.json": "{}"})
        folders.append(folder)
    return folders, states


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):  # mergekit may write one file, no index
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f.get_tensor(name)
    return out


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def ours_and_mergekits(tmp_path: Path, recipe: Path) -> tuple[dict, dict]:
    """The CLI's output of ``recipe`` and mergekit's (same tensor names), read."""
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "ours"), "--quiet"]) == 0
    run_mergekit(recipe, tmp_path / "theirs")
    ours, theirs = _read(tmp_path / "ours"), _read(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    return ours, theirs


def on_cpu_and_cuda(tmp_path: Path, capsys, recipe: Path) -> tuple[dict, dict]:
    """The CLI's output of ``recipe`` on the CPU and on CUDA (same tensor names), read."""
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        rc = cli.main(["run", str(recipe), "--out", str(out), "--quiet", "--device", device])
        assert rc == 0, capsys.readouterr().err
        results[device] = _read(out)
    assert set(results["cpu"]) == set(results["cuda"])
    return results["cpu"], results["cuda"]


CONFIGS = {
    "linear": (
        "merge_method: linear\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.3}}\n"
        "  - model: {m2}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {m0}\n    parameters: {{weight: 0.2}}\ndtype: bfloat16\n"
    ),
    "task_arithmetic": (
        "merge_method: task_arithmetic\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.7}}\n"
        "  - model: {m2}\n    parameters: {{weight: [0.2, 0.9]}}\n"
        "parameters: {{lambda: 0.8}}\ndtype: bfloat16\n"
    ),
    "ties": (
        "merge_method: ties\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters:\n      density: [1, 0.7, 0.1]\n      weight: 0.6\n"
        "  - model: {m2}\n    parameters:\n      density: 0.5\n"
        "      weight: [{{filter: mlp, value: 0.5}}, {{value: 0.8}}]\n"
        "parameters: {{normalize: true, int8_mask: true}}\ndtype: bfloat16\n"
    ),
    "dare_ties": (
        "merge_method: dare_ties\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{density: 0.53, weight: 0.4}}\n"
        "  - model: {m2}\n    parameters: {{density: 0.6, weight: 0.5}}\n"
        "parameters: {{int8_mask: true}}\ndtype: bfloat16\n"
    ),
    "dare_linear": (
        "merge_method: dare_linear\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n  - model: {m2}\n"
        "parameters: {{density: 0.5, weight: 0.5, normalize: true}}\ndtype: bfloat16\n"
    ),
    "della": (
        "merge_method: della\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{density: 0.6, epsilon: 0.1, weight: 0.5}}\n"
        "  - model: {m2}\n    parameters: {{density: 0.5, weight: 0.5}}\ndtype: bfloat16\n"
    ),
    "breadcrumbs_ties": (
        "merge_method: breadcrumbs_ties\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{density: 0.8, gamma: 0.05, weight: 0.5}}\n"
        "  - model: {m2}\n    parameters: {{density: 0.7, weight: 0.5}}\ndtype: bfloat16\n"
    ),
}


def _expected(method: str, states: list[dict], seed: int) -> dict[str, torch.Tensor]:
    from shardmerge.schedule import find_layer

    out = {}
    for name, base in states[0].items():
        if not base.is_floating_point():
            out[name] = (states[1][name] if method == "linear" else base).clone()
            continue
        layer = find_layer(name)
        p = 0.0 if layer is None else layer[1] / (LAYERS - 1)
        if method == "linear":
            out[name] = dense_linear([states[1][name], states[2][name], base], [0.3, 0.5, 0.2])
            continue
        models = [states[1][name], states[2][name]]
        shared: dict = {}
        gammas = [0.01, 0.01]
        if method == "task_arithmetic":
            weights, densities, shared = [0.7, 0.2 + 0.7 * p], [1.0, 1.0], {"lambda": 0.8}
        elif method == "ties":
            density = 1 - 0.3 * 2 * p if p <= 0.5 else 0.7 - 0.6 * (2 * p - 1)
            weights = [0.6, 0.5 if "mlp" in name else 0.8]
            densities = [density, 0.5]
        elif method == "dare_ties":
            weights, densities = [0.4, 0.5], [0.53, 0.6]
        elif method == "dare_linear":
            weights, densities, shared = [0.5, 0.5], [0.5, 0.5], {"normalize": True}
        elif method == "della":
            out[name] = dense_task_vectors(
                method, base, models, [0.5, 0.5], [0.6, 0.5], gammas, {}, name, seed, [0.1, 0.15]
            )
            continue
        else:
            weights, densities, gammas = [0.5, 0.5], [0.8, 0.7], [0.05, 0.01]
        out[name] = dense_task_vectors(
            method, base, models, weights, densities, gammas, shared, name, seed
        )
    return out


@pytest.mark.parametrize("method", list(CONFIGS))
def test_configs_run_and_match_the_reference(tmp_path, capsys, monkeypatch, method):
    folders, states = _family(tmp_path)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS[method].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    got = _read(tmp_path / "out")
    expected = _expected(method, states, seed=0)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{method}` merge of 3 checkpoints" in card
    # Tiny chunks (1024 elements: the embedding takes 5 of them) give the same bytes.
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "small"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert _shard_bytes(tmp_path / "small") == _shard_bytes(tmp_path / "out")


def test_float32_merge_dtype_is_the_precise_path(tmp_path, capsys):
    """``dtype: float32`` with ``out_dtype: bfloat16`` (mergekit's keys) computes the task
    vectors in float32 and rounds once: within one bf16 step of a float64 reference everywhere,
    and closer to it than the default bf16 op-by-op arithmetic (mergekit's order)."""
    folders, states = _family(tmp_path)
    config = (
        "merge_method: task_arithmetic\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.7}}\n"
        "  - model: {m2}\n    parameters: {{weight: 0.45}}\n"
        "parameters: {{lambda: 0.8}}\n"
    )
    folder_names = {f"m{j}": f for j, f in enumerate(folders)}
    got = {}
    for name, dtypes in (
        ("precise", "dtype: float32\nout_dtype: bfloat16\n"),
        ("bf16", "dtype: bfloat16\n"),
    ):
        recipe = tmp_path / f"{name}.yml"
        recipe.write_text((config + dtypes).format(**folder_names))
        out = tmp_path / name
        assert cli.main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0, (
            capsys.readouterr()
        )
        got[name] = _read(out)
    off = {"precise": 0, "bf16": 0}
    for tensor_name, base in states[0].items():
        if not base.is_floating_point():
            continue
        b = base.double()
        deltas = [(s[tensor_name].double() - b) for s in states[1:]]
        want = (b + 0.8 * (0.7 * deltas[0] + 0.45 * deltas[1])).to(torch.bfloat16)
        assert got["precise"][tensor_name].dtype == torch.bfloat16
        assert _max_steps(got["precise"][tensor_name], want) <= 1, tensor_name
        for name in off:
            off[name] += int((got[name][tensor_name] != want).sum())
    assert off["precise"] < off["bf16"], off


def test_random_seed_changes_dare_masks_and_is_recorded(tmp_path, capsys):
    folders, states = _family(tmp_path)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS["dare_ties"].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    out = tmp_path / "out"
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet", "--random-seed", "9"]) == 0
    got = _read(out)
    expected = _expected("dare_ties", states, seed=9)
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    assert "Random masks: seed 9." in (out / "README.md").read_text()
    assert _read(out)["model.norm.weight"].shape == (16,)
    capsys.readouterr()


def test_verify_recomputes_a_ties_merge(tmp_path, capsys):
    folders, _ = _family(tmp_path)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS["ties"].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    out = tmp_path / "out"
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    rc = cli.main(["verify", str(out), "--recipe", str(recipe), "--full"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "recomputed" in captured.out


# --------------------------------------------------------------------------- mergekit


@needs_mergekit
@pytest.mark.parametrize("method", list(CONFIGS))
def test_agrees_with_mergekit(tmp_path, capsys, method):
    folders, states = _family(tmp_path, llama=True)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS[method].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    ours, theirs = ours_and_mergekits(tmp_path, recipe)
    for name, mine in ours.items():
        other = theirs[name].to(mine.dtype)
        base = states[0][name]
        if method in ("linear", "task_arithmetic"):
            assert _max_steps(mine, other) <= 1, name
        elif method.startswith(("dare", "della")):
            # Random masks differ (mergekit's come from torch's global generator): compare
            # the L1 norm of the change where there are enough elements for it to be stable.
            if mine.numel() >= 4096:
                l1_ours = (mine.float() - base.float()).abs().sum().item()
                l1_theirs = (other.float() - base.float()).abs().sum().item()
                assert math.isclose(l1_ours, l1_theirs, rel_tol=0.05), name
        else:
            # Outputs may differ only where some model's |delta| is tied with the element at a
            # selection boundary (mergekit keeps arbitrary ones among such ties, we the first).
            differ = (mine != other).reshape(-1)
            tied = torch.zeros_like(differ)
            for model in (states[1][name], states[2][name]):
                keys = magnitude_keys((model - base).reshape(-1))
                for boundary in _boundary_keys(method, name, keys):
                    tied |= keys == boundary
            assert not (differ & ~tied).any(), name
    capsys.readouterr()


def _boundary_keys(method: str, name: str, keys: torch.Tensor) -> list[int]:
    """The magnitude keys at the selection boundaries of CONFIGS[method] for this tensor
    (any density the config can give this model: both models' values are tried)."""
    n = keys.numel()
    ordered = torch.sort(keys, descending=True).values
    ranks = []
    if method == "ties":
        from shardmerge.schedule import find_layer

        layer = find_layer(name)
        p = 0.0 if layer is None else layer[1] / (LAYERS - 1)
        density = 1 - 0.3 * 2 * p if p <= 0.5 else 0.7 - 0.6 * (2 * p - 1)
        ranks = [max(1, int(d * n)) for d in (density, 0.5)]
    else:  # breadcrumbs_ties
        for density, gamma in ((0.8, 0.05), (0.7, 0.01)):
            target, n_top = int(density * n), int(gamma * n)
            top = n - max(0, n - target - n_top) - target
            ranks += [top, top + target]
    return [int(ordered[r - 1]) for r in ranks if 0 < r < n] + [
        int(ordered[r]) for r in ranks if 0 <= r < n
    ]


def _read_base(folder: Path, name: str) -> torch.Tensor:
    return _read(folder)[name]


def _max_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in units in the last place of their dtype."""
    ia = a.contiguous().view(torch.int16).to(torch.int64)
    ib = b.contiguous().view(torch.int16).to(torch.int64)
    # Map sign-magnitude bit patterns to a monotonic integer line.
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


OURS_TIES = """
method: ties
base: {m0}
models:
  m1:
    path: {m1}
    weight: 0.6
    density: {{default: {{gradient: [1, 0.7, 0.1]}}, non_layer: 1}}
  m2:
    path: {m2}
    density: 0.5
    weight:
      default: 0.8
      rules: [{{match: mlp, value: 0.5}}]
parameters: {{normalize: true, int8_mask: true}}
output: {{dtype: bfloat16}}
"""


def test_our_format_runs_the_same_merge_as_the_mergekit_config(tmp_path, capsys):
    folders, _ = _family(tmp_path)
    names = {f"m{j}": f for j, f in enumerate(folders)}
    theirs = tmp_path / "mk.yml"
    theirs.write_text(CONFIGS["ties"].format(**names))
    ours = tmp_path / "ours.yml"
    ours.write_text(OURS_TIES.format(**names))
    assert cli.main(["run", str(theirs), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert cli.main(["run", str(ours), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert cli.main(["plan", str(ours)]) == 0
    shown = capsys.readouterr().out
    assert "density of models.m1:" in shown and "method: ties" in shown


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (("method: ties", "method: tie"), "method: unknown merge method 'tie'; supported methods"),
        (("base: {m0}\n", ""), "base: missing; ties needs a base"),
        (("density: 0.5", "density: 1.5"), "models.m2.density: 1.5 is outside [0, 1]"),
        (("    weight: 0.6\n", ""), "models.m1.weight: missing; ties needs a weight"),
        (("density: 0.5", "densty: 0.5"), "models.m2.densty: unknown key; did you mean 'density'?"),
    ],
)
def test_our_format_bad_input_is_one_line_exit_2(tmp_path, capsys, edit, needle):
    folders, _ = _family(tmp_path)
    text = OURS_TIES.replace(*edit).format(**{f"m{j}": f for j, f in enumerate(folders)})
    recipe = tmp_path / "bad.yml"
    recipe.write_text(text)
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_python_api_runs_a_dict_recipe(tmp_path):
    import shardmerge

    folders, states = _family(tmp_path)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(folders[0]),
        "models": [
            {"model": str(folders[1]), "parameters": {"weight": 0.7}},
            {"model": str(folders[2]), "parameters": {"weight": [0.2, 0.9]}},
        ],
        "parameters": {"lambda": 0.8},
        "dtype": "bfloat16",
    }
    out = shardmerge.merge(recipe, out=tmp_path / "out", quiet=True)
    got = _read(out)
    expected = _expected("task_arithmetic", states, seed=0)
    assert all(torch.equal(got[n], t) for n, t in expected.items())


OURS_DARE = """
method: dare_ties
base: {m0}
models:
  - {{path: {m1}, weight: 0.4, density: 0.53}}
  - {{path: {m2}, weight: 0.5, density: {{default: {{gradient: [0.9, 0.3]}}, non_layer: 0.6}}}}
random_seed: 3
output: {{dtype: bfloat16, shard_size: 8KB}}
"""


def test_dare_is_byte_identical_after_a_kill_and_resume_and_across_processes(tmp_path):
    import torch.distributed as dist

    from tests.test_distributed import _launch

    folders, _ = _family(tmp_path)
    recipe = tmp_path / "dare.yml"
    recipe.write_text(OURS_DARE.format(**{f"m{j}": f for j, f in enumerate(folders)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SHARDMERGE_KILL_AT", None)

    def run(out: Path, *extra: str, kill_at: str | None = None) -> int:
        argv = ["run", str(recipe), "--out", str(out), "--quiet", "--device", "cpu", *extra]
        cmd = [sys.executable, "-m", "shardmerge.cli", *argv]
        run_env = dict(env, SHARDMERGE_KILL_AT=kill_at) if kill_at else env
        return subprocess.run(cmd, env=run_env, capture_output=True, timeout=120).returncode

    assert run(tmp_path / "one") == 0
    reference = _shard_bytes(tmp_path / "one")
    assert len(reference) >= 3
    assert run(tmp_path / "killed", kill_at="shard-done:2") != 0
    assert not (tmp_path / "killed").exists()
    assert run(tmp_path / "killed", "--resume") == 0
    assert _shard_bytes(tmp_path / "killed") == reference
    if dist.is_available() and dist.is_gloo_available():
        proc = _launch("env", 2, recipe, tmp_path / "two")
        assert proc.returncode == 0, proc.stderr
        assert _shard_bytes(tmp_path / "two") == reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_the_dense_reference_with_whole_rows_per_chunk(method, dtype):
    base, models = _inputs(dtype, n=100 * 60, ties=True)  # 60 rows of 100
    weights, densities, epsilons = [0.6, -0.3, 1.1], [0.35, 0.7, 1.0], [0.1, 0.2, 0.15]
    _, _, normalize, rescale = FAMILIES[method]
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
    params = tuple(
        {"weight": w, "density": d, "epsilon": e}
        for w, d, e in zip(weights, densities, epsilons, strict=True)
    )
    job = TensorJob("layers.1.w", base.numel(), dtype, params, shared, 4, row_len=100)
    shaped = [t.view(60, 100) for t in (base, *models)]
    expected = dense_task_vectors(
        method,
        shaped[0],
        shaped[1:],
        weights,
        densities,
        [0.0] * 3,
        shared,
        "layers.1.w",
        4,
        epsilons,
    ).reshape(-1)
    for chunk in (150, 1024, 1 << 20):  # 1, 10 and all 60 rows per chunk
        got = passes.merge_tensor(job, method, [base, *models], chunk)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (method, chunk)


def test_della_epsilon_outside_the_unit_interval_is_refused(tmp_path, capsys):
    folders, _ = _family(tmp_path)
    recipe = tmp_path / "della.yml"
    recipe.write_text(
        f"merge_method: della\nbase_model: {folders[0]}\nmodels:\n"
        f"  - model: {folders[1]}\n    parameters: {{weight: 1, density: 0.9, epsilon: 0.2}}\n"
    )
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "models[0].parameters: density 0.9 +/- epsilon 0.2 must stay inside (0, 1)" in err
    assert not (tmp_path / "out").exists()


def test_della_rows_longer_than_a_chunk(tmp_path, capsys, monkeypatch):
    g = torch.Generator().manual_seed(2)
    base = {"model.layers.0.w": torch.randn(3, 3000, generator=g), "norm": torch.randn(5000)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    states = [{k: v.to(torch.bfloat16) for k, v in s.items()} for s in (base, tuned)]
    config = {"model_type": "llama", "tie_word_embeddings": True}
    folders = [write_checkpoint(tmp_path / f"m{j}", s, None, config) for j, s in enumerate(states)]
    recipe = tmp_path / "della.yml"
    recipe.write_text(
        f"method: della_linear\nbase: {folders[0]}\n"
        f"models: [{{path: {folders[1]}, weight: 0.8, density: 0.5}}]\n"
    )
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)  # rows of 3000 and 5000 elements
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    for name, b in states[0].items():
        expected = dense_task_vectors(
            "della_linear", b, [states[1][name]], [0.8], [0.5], [0.0], {}, name, 0
        )
        assert torch.equal(got[name], expected), name
    capsys.readouterr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(CONFIGS))
def test_cuda_gives_the_cpu_result(tmp_path, capsys, method):
    """Every method through the K-input engine on CUDA: the CPU's bytes, or within one bf16
    step where a reduction (DARE's L1 norms, TIES' sums) adds in another order on the device."""
    from tests.test_gpu import _assert_within_one_step

    folders, _ = _family(tmp_path)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS[method].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    cpu, gpu = on_cpu_and_cuda(tmp_path, capsys, recipe)
    for name in cpu:
        if not cpu[name].is_floating_point():
            assert torch.equal(cpu[name], gpu[name]), name
            continue
        _assert_within_one_step(cpu[name], gpu[name], name)


def test_only_slerp_faults_in_slerps_chunk_slots(tmp_path, monkeypatch):
    # The pass engine has pools of its own: mapping SLERP's slots for it only cost RSS (192 MB
    # measured on a four-model merge). chunk_buffers is shrunk so these tiny merges count as
    # large enough to fault the slots in early.
    import types

    import shardmerge
    from shardmerge import pipeline

    faulted: list[int] = []
    real_fault_in = pipeline._fault_in
    monkeypatch.setattr(
        pipeline, "chunk_buffers", lambda plan: types.SimpleNamespace(total_bytes=1)
    )
    monkeypatch.setattr(pipeline, "_fault_in", lambda n: faulted.append(n) or real_fault_in(n))
    folders, _ = _family(tmp_path)
    ties = {
        "merge_method": "ties",
        "base_model": str(folders[0]),
        "models": [
            {"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in folders[1:]
        ],
        "dtype": "bfloat16",
    }
    shardmerge.merge(ties, out=tmp_path / "ties", quiet=True)
    assert faulted == []
    slerp = {
        "merge_method": "slerp",
        "base_model": str(folders[0]),
        "models": [{"model": str(f)} for f in folders[:2]],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
    }
    shardmerge.merge(slerp, out=tmp_path / "slerp", quiet=True)
    assert faulted == [1]


@pytest.mark.parametrize("method", ["dare_ties", "della", "breadcrumbs"])
@pytest.mark.parametrize("cache_bytes", [task_vectors.MASK_CACHE_BYTES, 0])
def test_masks_kept_from_the_l1_pass_are_the_masks_drawn_again(monkeypatch, method, cache_bytes):
    """With rescaling, the L1 pass keeps each chunk's mask (packed) for the combine, which then
    draws none; with no room for them the combine draws them again. Same bytes either way, and
    with rows of 7 elements (DELLA's chunks then start off a 16-element boundary) too."""
    monkeypatch.setattr(task_vectors, "MASK_CACHE_BYTES", cache_bytes)
    base, models = _inputs(torch.bfloat16, n=7 * 1500, k=2)
    weights, densities, gammas = [0.6, 0.4], [0.35, 0.7], [0.02, 0.05]
    shared = {"normalize": True, "rescale": True, "lambda": 1.0}
    job = _job("layers.0.w", base.numel(), torch.bfloat16, weights, densities, gammas, shared)
    job = TensorJob(**{**job.__dict__, "row_len": 7})
    shaped = [t.view(1500, 7) for t in (base, *models)]
    expected = dense_task_vectors(
        method, shaped[0], shaped[1:], weights, densities, gammas, shared, "layers.0.w", 0
    ).reshape(-1)
    drawn = []
    original = task_vectors._Model.mask_bits

    def counting(self, delta, start):
        drawn.append(start)
        return original(self, delta, start)

    monkeypatch.setattr(task_vectors._Model, "mask_bits", counting)
    got = passes.merge_tensor(job, method, [base, *models], 1024)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    chunks = len(passes._spans(base.numel(), passes._method_chunk(1024, method == "della", 7)))
    assert len(drawn) == 2 * chunks * (1 if cache_bytes else 2)


def test_an_infinite_delta_gives_mergekits_nan_norm():
    """The L1 pass's masked norm takes |delta|'s bits under the mask, which equals mergekit's
    |delta * mask| only for finite deltas: with an infinity (times 0.0: a NaN), the old way."""
    base, models = _inputs(torch.bfloat16, n=4096, k=2)
    models[0][5] = float("inf")
    shared = {"normalize": False, "rescale": True, "lambda": 1.0}
    job = _job("x", base.numel(), torch.bfloat16, [0.5, 0.5], [0.5, 0.5], None, shared)
    expected = dense_task_vectors(
        "dare_ties", base, models, [0.5, 0.5], [0.5, 0.5], [0.0, 0.0], shared, "x", 0
    )
    got = passes.merge_tensor(job, "dare_ties", [base, *models], 1024)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


_WATCHED = itertools.count()


class _Watched:
    """A method's tensor merge that logs each call (merge, phase, start, in order?, entry, exit)
    and takes a little longer in each, so that calls made side by side overlap."""

    def __init__(self, merge, log):
        self._merge, self._log = merge, log
        self.passes = merge.passes
        self._number = next(_WATCHED)

    def __getattr__(self, name):
        return getattr(self._merge, name)

    def _call(self, phase, start, fn):
        any_order = getattr(self._merge, "in_any_order", lambda phase: False)(phase)
        entry = time.perf_counter()
        time.sleep(0.002)
        out = fn()
        self._log.append((self._number, phase, start, not any_order, entry, time.perf_counter()))
        return out

    def reduce(self, pass_index, inputs, start):
        return self._call(pass_index, start, lambda: self._merge.reduce(pass_index, inputs, start))

    def combine(self, inputs, start):
        return self._call(self.passes, start, lambda: self._merge.combine(inputs, start))


@pytest.mark.parametrize(
    "method", ["dare_ties", "ties", "ties/in turn", "della", "breadcrumbs_ties/in turn"]
)
def test_compute_workers_give_one_workers_bytes_and_keep_ordered_phases_in_turn(
    tmp_path, capsys, monkeypatch, method
):
    """Several compute threads take chunks side by side: the files are those of one thread,
    a phase that its method does not declare order-free (in_any_order) runs its chunks in flat
    order one at a time, every phase starts once the one before it is done, and order-free
    phases did run side by side. "/in turn": magnitude selections without room to keep their
    chunks' tie counts, whose masks then go in flat order."""
    method, _, in_turn = method.partition("/")
    if in_turn:
        monkeypatch.setattr(task_vectors, "TIE_COUNT_BYTES", 0)
    folders, _ = _family(tmp_path)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS[method].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    side_by_side, ordered_phases = run_watched(tmp_path, capsys, monkeypatch, method, recipe)
    assert side_by_side > 0
    assert (ordered_phases > 0) == bool(in_turn)


def run_watched(tmp_path, capsys, monkeypatch, method, recipe) -> tuple[int, int]:
    """Runs ``recipe`` with one compute thread, then with three whose calls are watched
    (_Watched); checks that both wrote the same files, that every phase starts once the one
    before it is done and that ordered phases ran in flat order one chunk at a time. Returns
    how many calls overlapped another of their phase, and how many phases ran in order."""
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)  # the embedding: 5 chunks
    monkeypatch.setattr(passes, "CPU_WORKERS", 1)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    log: list[tuple] = []
    spec = passes.get_method(method)
    watched = dataclasses.replace(spec, start=lambda job: _Watched(spec.start(job), log))
    monkeypatch.setattr(passes, "get_method", lambda name: watched)
    monkeypatch.setattr(passes, "CPU_WORKERS", 3)
    monkeypatch.setattr(passes.os, "cpu_count", lambda: 4)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "three"), "--quiet"]) == 0
    capsys.readouterr()
    assert _shard_bytes(tmp_path / "three") == _shard_bytes(tmp_path / "one")
    side_by_side = ordered_phases = 0
    for merge in {entry[0] for entry in log}:
        calls = sorted((e for e in log if e[0] == merge), key=lambda e: e[4])
        for phase in sorted({c[1] for c in calls}):
            mine = [c for c in calls if c[1] == phase]
            later = [c for c in calls if c[1] > phase]
            assert all(c[4] >= max(m[5] for m in mine) for c in later), (merge, phase)
            overlaps = sum(b[4] < max(c[5] for c in mine[: i + 1]) for i, b in enumerate(mine[1:]))
            if mine[0][3]:  # in order
                ordered_phases += 1
                assert overlaps == 0, (merge, phase)
                assert [c[2] for c in mine] == sorted(c[2] for c in mine)
            side_by_side += overlaps
    return side_by_side, ordered_phases


def test_a_failing_chunk_stops_every_compute_worker(tmp_path, capsys, monkeypatch):
    """One worker's error ends the run (the others stop waiting for their turn): a one-line
    error, no output, no hang. A method's ValueError is what it makes of its inputs (exit 2)."""
    folders, _ = _family(tmp_path)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS["ties"].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)
    monkeypatch.setattr(passes, "CPU_WORKERS", 3)
    monkeypatch.setattr(passes.os, "cpu_count", lambda: 4)
    spec = passes.get_method("ties")
    calls = itertools.count()

    class Failing(_Watched):
        def combine(self, inputs, start):
            if next(calls) == 2:
                raise ValueError("chunk went wrong")
            return super().combine(inputs, start)

    failing = dataclasses.replace(spec, start=lambda job: Failing(spec.start(job), []))
    monkeypatch.setattr(passes, "get_method", lambda name: failing)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "error: chunk went wrong"
    assert not (tmp_path / "out").exists()
