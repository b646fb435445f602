"""model_stock, nuslerp, karcher and nearswap: dense references written here (whole tensors in
memory), chunk-size invariance of the streamed result, bad input, and (where
benchmarks/.venv-mergekit exists) agreement with mergekit 0.1.5 on a base and three fine-tunes."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from shardmerge import cli, passes
from shardmerge.methods import TensorJob, sums
from tests.conftest import needs_mergekit
from tests.test_methods import (
    _family,
    _max_steps,
    _read,
    _shard_bytes,
    on_cpu_and_cuda,
    ours_and_mergekits,
    run_watched,
)

# --------------------------------------------------------------------------- dense references
# From the method descriptions (mergekit 0.1.5's semantics), on whole tensors.


def dense_model_stock(base, models, filter_wise):
    """Model Stock in the merge dtype, with the norms and dot products summed in float64."""
    shape, dtype, k = base.shape, base.dtype, len(models)
    if filter_wise:
        w0 = base.reshape(-1, shape[-1]) if base.dim() >= 1 else base.reshape(1, 1)
    else:
        w0 = base.reshape(1, -1)
    ws = [x.reshape(w0.shape) for x in models]
    d = [x - w0 for x in ws]
    norms = [x.double().pow(2).sum(-1).sqrt().to(dtype) for x in d]
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            dot = (d[i] * d[j]).double().sum(-1).to(dtype)
            cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    denominator = 1 + (k - 1) * c
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, k * c / torch.where(singular, 1, denominator)).to(dtype)
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


def dense_nuslerp(w, x0, x1, base=None, flatten=True, row_wise=False):
    """NuSLERP: the vectors laid out explicitly (rows, or columns by transposing)."""
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    v0, v1 = (x0, x1) if base is None else (x0 - base, x1 - base)
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)  # mergekit's code: columns
    else:
        a, b = v0, v1
    dtype = a.dtype
    n0 = a.double().pow(2).sum(-1, keepdim=True).sqrt().to(dtype).clamp(min=1e-7)
    n1 = b.double().pow(2).sum(-1, keepdim=True).sqrt().to(dtype).clamp(min=1e-7)
    cos = ((a / n0) * (b / n1)).double().sum(-1, keepdim=True).to(dtype).clamp(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if not flatten and row_wise and v0.dim() >= 2:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return out if base is None else base + out


def dense_karcher(models, max_iter=10, tol=1e-5):
    """The Karcher mean by the textbook iteration on the whole (float64) vectors."""
    xs = [x.reshape(-1).double() for x in models]
    k = len(xs)
    if k == 1:
        return models[0]
    norms = [x.norm() for x in xs]
    valid = [i for i in range(k) if norms[i] > tol]
    units = [xs[i] / norms[i] for i in valid]
    alphas = [1 / len(valid)] * len(valid)
    mean = sum(a * u for a, u in zip(alphas, units, strict=True))
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units, strict=True):
            cos = torch.clamp(mean @ u, -1, 1)
            theta = torch.arccos(cos)
            if theta < tol:
                continue
            tangent += a * theta / torch.sin(theta) * (u - cos * mean)
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step
        mean = mean / mean.norm()
    scale = sum(norms) / k
    return (scale * mean).to(models[0].dtype).reshape(models[0].shape)


def dense_multislerp(weights, models, base=None, normalize=True, eps=1e-8):
    """Barycentric SLERP step by step on the whole (float64) vectors."""
    if len(models) == 1:
        return models[0]
    vs = [(x - base if base is not None else x).reshape(-1).double() for x in models]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = torch.stack([v.norm() for v in vs])
    units = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
    mean = sum(wi * ui for wi, ui in zip(w, units, strict=True))
    if mean.norm() < eps:
        out = w[0] * vs[0] + w[1] * vs[1]
    else:
        mean = mean / mean.norm()
        tangent = sum(wi * (ui - (ui @ mean) * mean) for wi, ui in zip(w, units, strict=True))
        step = tangent.norm() + eps
        out = (mean * torch.cos(step) + tangent * torch.sin(step) / step) * (norms * w).sum()
    out = out.to(models[0].dtype).reshape(models[0].shape)
    return out if base is None else base + out


def dense_nearswap(base, model, t):
    weight = (t / (base - model).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * model + (1 - weight) * base


# --------------------------------------------------------------------------- tensor level


def _tensors(dtype, rows=60, cols=100, k=3, spread=0.05):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(rows, cols, generator=g)
    models = [base + spread * torch.randn(rows, cols, generator=g) for _ in range(k)]
    models[-1][3] = base[3]  # a row with a zero task vector: cosine 0 there
    for m in models[1:]:
        m[5] = models[0][5]  # a row where the task vectors agree: cosine 1
    return base.to(dtype), [m.to(dtype) for m in models]


def _merged(method, job, inputs, chunks):
    flat = [x.reshape(-1) for x in inputs]
    outs = [passes.merge_tensor(job, method, flat, chunk) for chunk in chunks]
    for chunk, out in zip(chunks[1:], outs[1:], strict=True):
        assert torch.equal(out.view(torch.uint8), outs[0].view(torch.uint8)), (method, chunk)
    return outs[0].view(inputs[0].shape)


def _job(dtype, shape, model_params, shared):
    numel = math.prod(shape)
    return TensorJob(
        "model.layers.0.w", numel, dtype, model_params, shared, 0, row_len=shape[-1], shape=shape
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_the_dense_reference_at_any_chunk_size(dtype, filter_wise):
    base, models = _tensors(dtype)
    job = _job(dtype, base.shape, ({},) * 3, {"filter_wise": filter_wise})
    got = _merged("model_stock", job, [base, *models], (150, 1024, 3000, 1 << 20))
    assert torch.equal(got, dense_model_stock(base, models, filter_wise))
    if filter_wise:  # the zero task vector's row moves less than the others
        # t = 1 where the task vectors agree: that row is the models' (common) row.
        assert torch.allclose(got[5].float(), models[0][5].float(), rtol=0.01, atol=0.01)
    else:
        assert not torch.allclose(got[5].float(), models[0][5].float(), rtol=0.01, atol=0.01)


@pytest.mark.parametrize("row", [7, 2048, sums.F32_BLOCK, 3 * sums.F32_BLOCK + 100])
def test_float32_row_sums_are_close_to_float64_and_ignore_the_rows_around(row):
    g = torch.Generator().manual_seed(row)
    x = torch.randn(5 * row, generator=g).bfloat16()
    squares = x.float().square()
    got = sums.row_sums_f32(squares, row)
    exact = squares.double().view(-1, row).sum(1)
    assert got.dtype == torch.float64
    assert torch.allclose(got, exact, rtol=1e-6, atol=0)
    # Each row's sum is the same whichever rows share its call (any chunking of whole rows).
    alone = torch.cat([sums.row_sums_f32(squares[i * row : (i + 1) * row], row) for i in range(5)])
    assert torch.equal(got, alone)
    assert torch.equal(got[2:], sums.row_sums_f32(squares[2 * row :], row))


@pytest.mark.parametrize("keep_blocks", [False, True])
def test_block_sums_fold_in_flat_order_whatever_order_chunks_come_in(keep_blocks):
    g = torch.Generator().manual_seed(3)
    # Magnitudes far apart: a float64 sum taken in another order rounds differently.
    blocks = torch.randn(40, 3, generator=g, dtype=torch.float64) * 10 ** torch.randint(
        -8, 9, (40, 1), generator=g
    )
    cuts = [0, 3, 4, 11, 20, 21, 33, 40]
    in_order = sums.BlockSums(3, keep_blocks)
    for s, e in itertools.pairwise(cuts):
        in_order.add(blocks[s:e])
    shuffled = sums.BlockSums(3, keep_blocks)
    chunks = list(itertools.pairwise(cuts))
    for i in torch.randperm(len(chunks), generator=g).tolist():
        s, e = chunks[i]
        shuffled.add(blocks[s:e], s)
    assert shuffled.totals() == in_order.totals()
    reversed_sum = sums.BlockSums(3)
    reversed_sum.add(blocks.flip(0))
    assert reversed_sum.totals() != in_order.totals()  # the order shows in the bits
    if keep_blocks:
        assert torch.equal(shuffled.per_block(), blocks)
    with pytest.raises(AssertionError, match="added twice"):
        shuffled.add(blocks[3:4], 3)
    gap = sums.BlockSums(3)
    gap.add(blocks[4:11], 4)
    with pytest.raises(AssertionError, match="missing before block 4"):
        gap.totals()


def test_model_stock_singular_and_opposite_updates_keep_the_base():
    base = torch.zeros(4, 8)
    d = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    # Two opposite task vectors: cos = -1, denominator 1 + (2 - 1)(-1) = 0: t = 0, the base.
    job = _job(torch.float32, (4, 8), ({}, {}), {"filter_wise": False})
    got = _merged("model_stock", job, [base, base + d, base - d], (8, 32))
    assert torch.equal(got, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("flatten", "row_wise"), [(True, False), (False, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_the_dense_reference_at_any_chunk_size(dtype, flatten, row_wise, with_base):
    base, (x0, x1, _) = _tensors(dtype)
    weights = (0.3, 0.6)
    shared = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    job = _job(dtype, base.shape, tuple({"weight": w} for w in weights), shared)
    inputs = [base, x0, x1] if with_base else [x0, x1]
    got = _merged("nuslerp", job, inputs, (150, 1024, 3000, 1 << 20))
    expected = dense_nuslerp(weights, x0, x1, base if with_base else None, flatten, row_wise)
    assert (
        _max_steps(got, expected) <= 1
        if dtype == torch.bfloat16
        else torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    )
    assert not torch.equal(got, x0) and not torch.equal(got, x1)


def test_nuslerp_columns_are_not_rows():
    # mergekit's nuslerp_row_wise interpolates the columns (its code transposes dim 0 to the end).
    base, (x0, x1, _) = _tensors(torch.float32, rows=20, cols=30, spread=1.0)
    shared = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    job = _job(torch.float32, base.shape, ({"weight": 1.0}, {"weight": 1.0}), shared)
    got = _merged("nuslerp", job, [x0, x1], (30, 1 << 20))
    columns = dense_nuslerp((1.0, 1.0), x0.T.contiguous(), x1.T.contiguous(), flatten=False).T
    rows = dense_nuslerp((1.0, 1.0), x0, x1, flatten=False)
    assert torch.allclose(got, columns, atol=1e-6)
    assert not torch.allclose(got, rows, atol=1e-3)


def test_nuslerp_parallel_vectors_lerp_and_zero_weights_give_the_midpoint():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    shared = {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    job = _job(torch.float32, (4, 8), ({"weight": -0.5}, {"weight": 0.5}), shared)  # t = 0.5
    got = _merged("nuslerp", job, [x, 2 * x], (32,))
    assert torch.allclose(got, 1.5 * x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_karcher_matches_the_dense_reference_at_any_chunk_size(dtype, spread):
    base, models = _tensors(dtype, spread=spread)
    inputs = [base, *models]
    job = _job(dtype, base.shape, ({},) * 4, {"max_iter": 50, "tol": 1e-9})
    got = _merged("karcher", job, inputs, (1024, 3072, 1 << 20))
    expected = dense_karcher(inputs, 50, 1e-9)
    assert _max_steps(got.bfloat16(), expected.bfloat16()) <= 1
    if dtype == torch.float32:
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    # Not merely the normalised average (the iteration moves it, far apart models the most).
    units = [x.double() / x.double().norm() for x in inputs]
    average = sum(units) / 4
    average = average / average.norm() * sum(x.double().norm() for x in inputs) / 4
    if spread == 1.0:
        assert not torch.allclose(got.double(), average, atol=1e-3)


def test_karcher_of_one_model_is_the_model_and_of_zeros_is_zero():
    x = torch.randn(3, 5)
    job = _job(torch.float32, (3, 5), ({},), {"max_iter": 10, "tol": 1e-5})
    assert torch.equal(_merged("karcher", job, [x], (1024,)), x)
    zeros = torch.zeros(3, 5)
    job = _job(torch.float32, (3, 5), ({}, {}), {"max_iter": 10, "tol": 1e-5})
    assert torch.equal(_merged("karcher", job, [zeros, zeros], (1024,)), zeros)


def test_karcher_with_tol_0_takes_the_limits_where_mergekit_divides_0_by_0():
    """tol 0: a model at the mean (theta 0) pulls with theta / sin(theta) -> 1 times a zero
    vector, and a zero tangent ends the iteration; mergekit writes NaNs there, ours is the
    same as with a tiny tol."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    y = x + 0.1 * torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    for models in ([x, x], [x, y, x]):
        zero = _job(torch.float32, (4, 8), ({},) * len(models), {"max_iter": 6, "tol": 0.0})
        tiny = _job(torch.float32, (4, 8), ({},) * len(models), {"max_iter": 6, "tol": 1e-30})
        got = _merged("karcher", zero, models, (1024,))
        assert bool(got.isfinite().all())
        assert torch.equal(got, _merged("karcher", tiny, models, (1024,)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_the_dense_reference_at_any_chunk_size(dtype, with_base):
    base, models = _tensors(dtype, spread=0.5)
    weights = (0.5, 0.2, 0.6)
    job = _job(dtype, base.shape, tuple({"weight": w} for w in weights), _MULTI)
    inputs = [base, *models] if with_base else models
    got = _merged("multislerp", job, inputs, (1024, 3072, 1 << 20))
    expected = dense_multislerp(weights, models, base if with_base else None)
    assert _max_steps(got.bfloat16(), expected.bfloat16()) <= 1
    if dtype == torch.float32:
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


_MULTI = {"normalize_weights": True, "eps": 1e-8}


def test_multislerp_edges():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    one = _job(torch.float32, (4, 8), ({"weight": 2.0},), _MULTI)
    assert torch.equal(_merged("multislerp", one, [torch.zeros(4, 8), x], (1024,)), x)
    # Antipodal models with equal weights: two take the lerp (zero here), three are an error.
    two = _job(torch.float32, (4, 8), ({"weight": 1.0}, {"weight": 1.0}), _MULTI)
    assert torch.equal(_merged("multislerp", two, [x, -x], (1024,)), torch.zeros(4, 8))
    three = _job(torch.float32, (4, 8), tuple({"weight": w} for w in (1.0, 0.5, 0.5)), _MULTI)
    with pytest.raises(ValueError, match="weighted sum of the unit vectors is zero"):
        _merged("multislerp", three, [x, -x, -x], (1024,))


def test_multislerp_with_eps_0_and_a_zero_task_vector_is_one_line_exit_2(tmp_path, capsys):
    """mergekit divides 0 by 0 there and writes NaNs; we stop with the tensor's name, exit code
    2, and write nothing."""
    from tests.conftest import write_checkpoint

    folders, states = _family(tmp_path)
    write_checkpoint(tmp_path / "same", states[0])  # the base again: zero task vectors
    recipe = tmp_path / "merge.yml"
    recipe.write_text(
        f"merge_method: multislerp\nbase_model: {folders[0]}\nmodels:\n"
        f"  - model: {folders[1]}\n  - model: {tmp_path / 'same'}\n"
        "parameters: {weight: 0.5, eps: 0}\ndtype: bfloat16\n"
    )
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "eps is 0" in err and "tensor '" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nearswap_matches_the_dense_reference(dtype):
    base, (x, _, _) = _tensors(dtype)
    job = _job(dtype, base.shape, ({},), {"t": 0.02})
    got = _merged("nearswap", job, [base, x], (1024, 1 << 20))
    assert torch.equal(got, dense_nearswap(base, x, 0.02))


# --------------------------------------------------------------------------- through the CLI

CONFIGS = {
    "model_stock": (
        "merge_method: model_stock\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n  - model: {m2}\n  - model: {m3}\ndtype: bfloat16\n"
    ),
    "model_stock_filter_wise": (
        "merge_method: model_stock\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n  - model: {m2}\n  - model: {m3}\n"
        "parameters: {{filter_wise: true}}\ndtype: bfloat16\n"
    ),
    "nuslerp": (
        "merge_method: nuslerp\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.4}}\n"
        "  - model: {m2}\n    parameters: {{weight: [0.2, 0.8]}}\ndtype: float32\n"
    ),
    "nuslerp_task_vectors_rows": (
        "merge_method: nuslerp\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.6}}\n"
        "  - model: {m2}\n    parameters: {{weight: 0.4}}\n"
        "parameters: {{nuslerp_flatten: false}}\ndtype: bfloat16\n"
    ),
    "nuslerp_task_vectors_columns": (
        "merge_method: nuslerp\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {m3}\n    parameters: {{weight: 0.5}}\n"
        "parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\ndtype: bfloat16\n"
    ),
    "karcher": (
        "merge_method: karcher\nmodels:\n"
        "  - model: {m1}\n  - model: {m2}\n  - model: {m3}\n"
        "parameters: {{max_iter: 20, tol: 1.0e-7}}\ndtype: bfloat16\n"
    ),
    "karcher_float32": (
        "merge_method: karcher\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n  - model: {m2}\ndtype: float32\nout_dtype: bfloat16\n"
    ),
    "multislerp": (
        "merge_method: multislerp\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {m2}\n    parameters: {{weight: [0.2, 0.6]}}\n"
        "  - model: {m3}\n    parameters: {{weight: 0.3}}\ndtype: float32\nout_dtype: bfloat16\n"
    ),
    "nearswap": (
        "merge_method: nearswap\nbase_model: {m0}\nmodels:\n"
        "  - model: {m2}\nparameters: {{t: 0.01}}\ndtype: bfloat16\n"
    ),
}


def _expected(config: str, states: list[dict]) -> dict[str, torch.Tensor]:
    from shardmerge.schedule import find_layer

    out = {}
    for name, base in states[0].items():
        models = [s[name] for s in states[1:]]
        if not base.is_floating_point():
            first = config.startswith("karcher") or config == "nuslerp"  # no base: the first model
            out[name] = (models[0] if first else base).clone()
        elif config.startswith("model_stock"):
            out[name] = dense_model_stock(base, models, config.endswith("filter_wise"))
        elif config == "nuslerp":
            layer = find_layer(name)
            p = 0.0 if layer is None else layer[1] / 2
            x0, x1 = models[0].float(), models[1].float()
            out[name] = dense_nuslerp((0.4, 0.2 + 0.6 * p), x0, x1)
        elif config == "nuslerp_task_vectors_rows":
            out[name] = dense_nuslerp((0.6, 0.4), models[0], models[1], base, flatten=False)
        elif config == "nuslerp_task_vectors_columns":
            out[name] = dense_nuslerp((0.5, 0.5), models[0], models[2], base, False, True)
        elif config == "karcher":
            out[name] = dense_karcher(models, 20, 1e-7)
        elif config == "karcher_float32":  # the base_model is merged as one more model
            inputs = [x.float() for x in (*models[:2], base)]
            out[name] = dense_karcher(inputs).bfloat16()
        elif config == "multislerp":
            layer = find_layer(name)
            p = 0.0 if layer is None else layer[1] / 2
            floats = [x.float() for x in models]
            weights = (0.5, 0.2 + 0.4 * p, 0.3)
            out[name] = dense_multislerp(weights, floats, base.float()).bfloat16()
        else:
            out[name] = dense_nearswap(base, models[1], 0.01)
    return out


def _write(tmp_path: Path, config: str, folders: list[Path]) -> Path:
    recipe = tmp_path / "merge.yml"
    recipe.write_text(CONFIGS[config].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    return recipe


@pytest.mark.parametrize("config", list(CONFIGS))
def test_configs_run_match_the_reference_and_ignore_the_chunk_size(
    tmp_path, capsys, monkeypatch, config
):
    folders, states = _family(tmp_path, tunes=3)
    recipe = _write(tmp_path, config, folders)
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    got = _read(tmp_path / "out")
    expected = _expected(config, states)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        mine = got[name]
        if not tensor.is_floating_point() or config.startswith(("model_stock", "nearswap")):
            assert torch.equal(mine, tensor), name
        elif tensor.dtype == torch.float32:
            assert torch.allclose(mine, tensor, rtol=1e-5, atol=1e-6), name
        else:  # sums taken in another order (float64 either way): a rounding may differ
            assert _max_steps(mine, tensor) <= 1, name
    methods = ("model_stock", "nuslerp", "karcher", "multislerp", "nearswap")
    method = next(m for m in methods if config.startswith(m))
    assert f"`{method}` merge of" in (tmp_path / "out" / "README.md").read_text()
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)  # the embedding takes 5 chunks
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "small"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert _shard_bytes(tmp_path / "small") == _shard_bytes(tmp_path / "out")


@pytest.mark.parametrize(
    "config", ["model_stock", "model_stock_filter_wise", "karcher", "multislerp", "nuslerp"]
)
def test_compute_workers_side_by_side_give_one_workers_bytes(tmp_path, capsys, monkeypatch, config):
    """Statistics passes whose block sums arrive out of order (BlockSums folds them in flat
    order) and order-free combines: three watched compute threads write one thread's files.
    nuslerp's norm and cosine passes go in turn."""
    folders, _ = _family(tmp_path, tunes=3)
    method = config.split("_filter")[0]
    side_by_side, ordered = run_watched(
        tmp_path, capsys, monkeypatch, method, _write(tmp_path, config, folders)
    )
    assert side_by_side > 0
    assert (ordered > 0) == (method == "nuslerp")


@needs_mergekit
@pytest.mark.parametrize("config", list(CONFIGS))
def test_agrees_with_mergekit_within_one_bf16_step(tmp_path, capsys, config):
    folders, states = _family(tmp_path, llama=True, tunes=3)
    recipe = _write(tmp_path, config, folders)
    ours, theirs = ours_and_mergekits(tmp_path, recipe)
    for name, mine in ours.items():
        other = theirs[name].to(mine.dtype)
        if config != "karcher":
            assert _max_steps(mine.bfloat16(), other.bfloat16()) <= 1, name
            continue
        # mergekit's bf16 karcher rounds its unit vectors, mean and scale to bf16 at every
        # step (several steps off the exact mean); ours rounds once (with dtype: float32 the
        # two agree, karcher_float32). Ours is the exact mean, and no farther from mergekit's
        # than mergekit's own error.
        exact = dense_karcher([s[name] for s in states[1:]], 20, 1e-7)
        assert _max_steps(mine, exact) <= 1, name
        assert _max_steps(mine, other) <= _max_steps(other, exact) + 1, name
    capsys.readouterr()


@pytest.mark.parametrize(
    ("config", "edit", "needle"),
    [
        (
            "model_stock",
            ("  - model: {m2}\n  - model: {m3}\n", ""),
            "models: model_stock needs at least 2 models besides the base model, got 1",
        ),
        (
            "karcher",
            ("max_iter: 20", "max_iter: 0"),
            "parameters.max_iter: 0 is below the minimum 1",
        ),
        (
            "karcher",
            ("max_iter: 20", "max_iter: 2.5"),
            "parameters.max_iter: 2.5 is not a whole number",
        ),
        (
            "nuslerp",
            ("dtype: float32", "  - model: {m3}\n    parameters: {{weight: 1}}\ndtype: float32"),
            "models: nuslerp needs exactly 2 models, got 3",
        ),
        (
            "nearswap",
            ("parameters: {{t: 0.01}}\n", ""),
            "parameters.t: missing; nearswap needs it",
        ),
        (
            "nuslerp",
            ("weight: 0.4", "wieght: 0.4"),
            "models[0].parameters.wieght: unknown parameter for nuslerp; did you mean 'weight'?",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, config, edit, needle):
    folders, _ = _family(tmp_path, tunes=3)
    recipe = tmp_path / "bad.yml"
    text = CONFIGS[config].replace(*edit)
    recipe.write_text(text.format(**{f"m{j}": f for j, f in enumerate(folders)}))
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err, err
    assert not (tmp_path / "out").exists()


@needs_mergekit
def test_every_mergekit_method_is_supported():
    import subprocess

    from shardmerge.methods import METHODS, NOT_IMPLEMENTED
    from tests.conftest import MERGEKIT_YAML

    listing = (
        "from mergekit.merge_methods import registry\n"
        "print(' '.join(sorted(m.spec.name for m in registry.registered_methods())))"
    )
    python = MERGEKIT_YAML.with_name("python")
    done = subprocess.run([str(python), "-c", listing], capture_output=True, text=True, check=True)
    theirs = set(done.stdout.split())
    assert "ties" in theirs and "slerp" in theirs, done.stdout
    assert theirs <= set(METHODS), theirs - set(METHODS)
    assert NOT_IMPLEMENTED == ()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cuda_gives_the_cpu_result(tmp_path, capsys, config):
    """Each method's passes and combine on CUDA: the CPU's result within one bf16 step (sums
    are added in another order on the device)."""
    from tests.test_gpu import _assert_within_one_step

    folders, _ = _family(tmp_path, tunes=3)
    recipe = _write(tmp_path, config, folders)
    cpu, gpu = on_cpu_and_cuda(tmp_path, capsys, recipe)
    for name in cpu:
        if not cpu[name].is_floating_point():
            assert torch.equal(cpu[name], gpu[name]), name
            continue
        _assert_within_one_step(cpu[name], gpu[name], name)
