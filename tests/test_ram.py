"""``ram`` and ``ramplus_tl``: a dense reference (mergekit 0.1.5's code), the CLI, the order of
chunks, and mergekit itself where it is installed."""

from __future__ import annotations

import pytest
import torch

from shardmerge import cli, passes
from shardmerge.methods import TensorJob
from tests.conftest import needs_mergekit
from tests.test_methods import _family, _read, _shard_bytes, ours_and_mergekits, run_watched


def dense_ram(base, models, epsilon=1e-5, plus=None, out=None):
    """mergekit's ram_merge, or with ``plus = (r, alpha)`` its ramplus_tl_merge, on whole tensors;
    rounded to ``out`` (default: the inputs' dtype; RAM+'s float32 scales leave mergekit's
    result float32)."""
    tv = torch.stack([m - base for m in models], dim=0).view(len(models), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    z = tv * nonzero
    alone = z * unique
    if plus is not None:
        r, alpha = plus
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        alone = alone * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (alone + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return (base + merged.reshape_as(base)).to(out or base.dtype)


def _inputs(dtype):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(50, 90, generator=g)
    models = [base + 0.02 * torch.randn(50, 90, generator=g) for _ in range(3)]
    models[0][:10] = base[:10]  # rows one model leaves alone
    models[1][5:15] = base[5:15]
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_matches_the_dense_reference_at_any_chunk_size(dtype, method):
    base, models = _inputs(dtype)
    shared = {"epsilon": 0.02, "r": 0.5, "alpha": 0.3}
    job = TensorJob("model.layers.0.w", base.numel(), dtype, ({},) * 3, shared, 0, row_len=90)
    plus = (0.5, 0.3) if method == "ramplus_tl" else None
    want = dense_ram(base, models, 0.02, plus).reshape(-1)
    flat = [x.reshape(-1) for x in (base, *models)]
    for chunk in (1024, 2048, 1 << 20):
        got = passes.merge_tensor(job, method, flat, chunk)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (method, chunk)
    # The three cases happen: no model, one model, several models change an element.
    counts = (torch.stack([m - base for m in models]).abs() > 0.02).sum(dim=0)
    assert {0, 1, 2} <= set(counts.unique().tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["infinity", "nan", "epsilon 0", "huge epsilon"])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_bit_pattern_path_and_its_fallback_give_mergekits_bytes(dtype, case, method):
    """The 16-bit passes work from bit patterns (the combine where every task vector is
    finite, mergekit's expressions where one is not); both give the reference's bytes."""
    base, models = _inputs(dtype)
    epsilon = {"epsilon 0": 0.0, "huge epsilon": 1e30}.get(case, 0.02)
    if case == "infinity":
        models[1][20, 3] = float("inf")
    if case == "nan":
        models[2][30, 7] = float("nan")
    shared = {"epsilon": epsilon, "r": 0.5, "alpha": 0.3}
    job = TensorJob("w", base.numel(), dtype, ({},) * 3, shared, 0, row_len=90)
    plus = (0.5, 0.3) if method == "ramplus_tl" else None
    want = dense_ram(base, models, epsilon, plus).reshape(-1)
    flat = [x.reshape(-1) for x in (base, *models)]
    got = passes.merge_tensor(job, method, flat, 1024)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), case


@pytest.mark.parametrize("out", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_rounds_its_result_once_to_the_output_dtype(out, method):
    """RAM+'s float32 result goes to an output dtype unrounded, and is rounded once to it, as
    mergekit rounds its float32 result (a bf16 merge written as float16: not twice); RAM's
    result is the merge dtype's, then converted."""
    base, models = _inputs(torch.bfloat16)
    shared = {"epsilon": 0.02, "r": 0.5, "alpha": 0.3}
    job = TensorJob("w", base.numel(), torch.bfloat16, ({},) * 3, shared, 0, out_dtype=out)
    plus = (0.5, 0.3) if method == "ramplus_tl" else None
    want = dense_ram(base, models, 0.02, plus, out=out if plus else None).to(out).reshape(-1)
    flat = [x.reshape(-1) for x in (base, *models)]
    got = passes.merge_tensor(job, method, flat, 1024)
    assert got.dtype == out and torch.equal(got, want)
    if plus and out == torch.float16:  # rounding twice would differ here
        twice = dense_ram(base, models, 0.02, plus).to(out).reshape(-1)
        assert not torch.equal(got, twice)


CONFIGS = {
    "ram": (
        "merge_method: ram\nbase_model: {m0}\nmodels:\n  - model: {m1}\n  - model: {m2}\n"
        "parameters: {{epsilon: 0.02}}\ndtype: bfloat16\n"
    ),
    "ramplus_tl": (
        "merge_method: ramplus_tl\nbase_model: {m0}\nmodels:\n  - model: {m1}\n  - model: {m2}\n"
        "parameters: {{epsilon: 0.02, r: 0.5, alpha: [0.1, 0.4]}}\ndtype: bfloat16\n"
    ),
}


def _write(tmp_path, method, folders):
    recipe = tmp_path / f"{method}.yml"
    recipe.write_text(CONFIGS[method].format(**{f"m{j}": f for j, f in enumerate(folders)}))
    return recipe


@pytest.mark.parametrize("method", list(CONFIGS))
def test_ram_configs_run_match_the_reference_and_record_what_they_saw(
    tmp_path, capsys, monkeypatch, method
):
    from shardmerge.schedule import find_layer

    folders, states = _family(tmp_path)
    recipe = _write(tmp_path, method, folders)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    for name, base in states[0].items():
        if not base.is_floating_point():
            assert torch.equal(got[name], base), name
            continue
        plus = None
        if method == "ramplus_tl":
            layer = find_layer(name)
            plus = (0.5, 0.1 + 0.3 * (0.0 if layer is None else layer[1] / 2))
        want = dense_ram(base, [s[name] for s in states[1:]], 0.02, plus)
        assert torch.equal(got[name], want), name
    card = (tmp_path / "out" / "README.md").read_text()
    header = next(line for line in card.splitlines() if line.startswith("| layer |"))
    # RAM+ shows its scales of the unique contributions as the models' weights.
    assert ("| weight " in header) == (method == "ramplus_tl"), header
    assert "| kept " in header
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)  # the embedding takes 5 chunks
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "small"), "--quiet"]) == 0
    assert _shard_bytes(tmp_path / "small") == _shard_bytes(tmp_path / "out")
    capsys.readouterr()


def test_ramplus_counting_pass_runs_side_by_side(tmp_path, capsys, monkeypatch):
    folders, _ = _family(tmp_path)
    recipe = _write(tmp_path, "ramplus_tl", folders)
    side_by_side, _ordered = run_watched(tmp_path, capsys, monkeypatch, "ramplus_tl", recipe)
    assert side_by_side > 0


@needs_mergekit
@pytest.mark.parametrize("out_dtype", [None, "float16"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_ram_agrees_with_mergekit(tmp_path, capsys, method, out_dtype):
    """mergekit's bytes (RAM+: its float32 result, rounded to the merge dtype, or to the
    output dtype where one is set)."""
    folders, _ = _family(tmp_path, llama=True)
    recipe = _write(tmp_path, method, folders)
    if out_dtype:
        recipe.write_text(recipe.read_text() + f"out_dtype: {out_dtype}\n")
    ours, theirs = ours_and_mergekits(tmp_path, recipe)
    for name, mine in ours.items():
        assert torch.equal(mine, theirs[name].to(mine.dtype)), name
    capsys.readouterr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(CONFIGS))
def test_ram_on_cuda_gives_the_cpu_result(tmp_path, capsys, method):
    """Elementwise, and integer counts: the same bytes on the device."""
    folders, _ = _family(tmp_path)
    recipe = _write(tmp_path, method, folders)
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        rc = cli.main(["run", str(recipe), "--out", str(out), "--quiet", "--device", device])
        assert rc == 0, capsys.readouterr().err
    assert _shard_bytes(tmp_path / "cpu") == _shard_bytes(tmp_path / "cuda")
