"""``sce``: a dense reference of mergekit 0.1.5's SCE (its code, with a stable top-k), the CLI,
the order of the passes' chunks, bad input, and mergekit itself where it is installed."""

from __future__ import annotations

import math

import pytest
import torch

from shardmerge import cli, passes
from shardmerge.methods import TensorJob
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


def dense_sce(base: torch.Tensor, models: list[torch.Tensor], topk: float) -> torch.Tensor:
    """mergekit's sce_merge, op for op in the tensors' dtype, except that equal variances at
    the top-k threshold keep the first in flat order (a stable sort; mergekit's topk keeps
    arbitrary ones), and that the mean of squares is taken from a float64 sum (mergekit's
    float32 one may round a last bit differently)."""
    tvs = torch.stack([m - base for m in models])
    if topk < 1:
        mask = torch.zeros_like(tvs[0])
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk) if topk > 0 else 0
        if k:
            order = torch.sort(var.abs().reshape(-1), descending=True, stable=True).indices
            mask.view(-1)[order[:k]] = 1
        tvs = tvs * mask.unsqueeze(0)
    sign = tvs.sign()
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = sign == majority
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    squares = tvs.square().reshape(len(models), -1).to(torch.float64).sum(dim=1)
    weights = (squares.to(acc) / base.numel()).to(base.dtype)
    weight_sum = torch.sum(weights).item()
    if abs(weight_sum) < 1e-6:
        weights = torch.ones_like(weights) / len(models)
    else:
        weights = weights / weight_sum
    erased = weights.view(-1, *([1] * base.dim())) * erase
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _tensors(dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 130, generator=g)
    models = [base + 0.02 * torch.randn(40, 130, generator=g) for _ in range(3)]
    for m in models:
        m[7] = base[7] + 0.01  # a row of equal task vectors: zero variance
    models[1][9] = base[9]  # a row where one model keeps the base
    return base.to(dtype), [m.to(dtype) for m in models]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("kept", [True, False])
def test_sce_matches_the_dense_reference_at_any_chunk_size(dtype, topk, kept, monkeypatch):
    """``kept``: the variance keys and masks are kept between passes (tensors up to 32 Mi
    elements), or made again (larger ones)."""
    from shardmerge.methods import sce

    if not kept:
        monkeypatch.setattr(sce, "KEY_CACHE_NUMEL", 0)
        monkeypatch.setattr(sce, "MASK_CACHE_NUMEL", 0)
    base, models = _tensors(dtype)
    job = TensorJob(
        "model.layers.0.w", base.numel(), dtype, ({},) * 3, {"select_topk": topk}, 0, row_len=130
    )
    want = dense_sce(base, models, topk).reshape(-1)
    flat = [x.reshape(-1) for x in (base, *models)]
    for chunk in (1024, 3072, 1 << 20):
        got = passes.merge_tensor(job, "sce", flat, chunk)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (chunk, topk)
    if dtype == torch.bfloat16 and topk == 0.3:
        # The variances tie at the threshold here (bf16 rounds them), so the rule is exercised.
        var = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        kth = torch.sort(var.reshape(-1), descending=True).values[k - 1]
        assert int((var == kth).sum()) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_variance_is_torch_var_bit_for_bit(dtype, count):
    """The float64 Welford recurrence in pieces gives torch.var's CPU result (every finite
    value; a piece boundary falls inside the tensor)."""
    from shardmerge.methods.sce import VARIANCE_PIECE, _variance

    g = torch.Generator().manual_seed(count)
    n = VARIANCE_PIECE + 777
    scale = 10.0 ** torch.randint(-6, 3, (n,), generator=g)
    deltas = [(torch.randn(n, generator=g) * scale).to(dtype) for _ in range(count)]
    deltas[0][:50] = 0
    want = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    assert torch.equal(_variance(deltas), want)


def test_sce_with_a_select_topk_that_rounds_up_keeps_everything():
    """int(nonzero * select_topk) is a float32 product in mergekit: with every variance
    non-zero, 0.99999999 rounds k up to every element (the result of select_topk 1); with every
    variance zero, k is 0 and nothing is kept (the base)."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(3000, generator=g).to(torch.bfloat16)
    models = [(base.float() + sign).to(torch.bfloat16) for sign in (1, -1)]  # d0 > 0 > d1
    variance = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
    assert bool((variance != 0).all())
    flat = [base, *models]
    results = []
    for topk in (0.99999999, 1.0):
        job = TensorJob("w", 3000, torch.bfloat16, ({},) * 2, {"select_topk": topk}, 0)
        results.append(passes.merge_tensor(job, "sce", flat, 1024))
        assert torch.equal(results[-1], dense_sce(base, models, topk))
    assert torch.equal(results[0], results[1])
    same = [base.clone(), base.clone()]
    job = TensorJob("w", 3000, torch.bfloat16, ({},) * 2, {"select_topk": 0.5}, 0)
    assert torch.equal(passes.merge_tensor(job, "sce", [base, *same], 1024), base)


def test_sce_of_equal_task_vectors_is_their_common_value():
    """Equal task vectors: each weight 1/3, every model takes part, the base plus the vector."""
    base = torch.zeros(2048, dtype=torch.bfloat16)
    delta = torch.linspace(-1, 1, 2048).to(torch.bfloat16)
    job = TensorJob("w", 2048, torch.bfloat16, ({},) * 3, {"select_topk": 1.0}, 0)
    got = passes.merge_tensor(job, "sce", [base, delta, delta, delta], 1024)
    assert _max_steps(got, delta) <= 1


CONFIG = (
    "merge_method: sce\nbase_model: {m0}\nmodels:\n"
    "  - model: {m1}\n  - model: {m2}\n  - model: {m3}\n"
    "parameters: {{select_topk: [0.2, 0.8], int8_mask: true}}\ndtype: bfloat16\n"
)


def _write(tmp_path, folders, text=CONFIG):
    recipe = tmp_path / "merge.yml"
    recipe.write_text(text.format(**{f"m{j}": f for j, f in enumerate(folders)}))
    return recipe


def test_sce_config_runs_matches_the_reference_and_records_its_weights(
    tmp_path, capsys, monkeypatch
):
    from shardmerge.schedule import find_layer

    folders, states = _family(tmp_path, tunes=3)
    recipe = _write(tmp_path, folders)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    for name, base in states[0].items():
        if not base.is_floating_point():  # integer buffers: the base's
            assert torch.equal(got[name], base), name
            continue
        layer = find_layer(name)
        topk = 0.2 + 0.6 * (0.0 if layer is None else layer[1] / 2)  # the gradient, 3 layers
        want = dense_sce(base, [s[name] for s in states[1:]], topk)
        assert torch.equal(got[name], want), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`sce` merge of 4 checkpoints" in card
    # The card's table has SCE's calculated weights (about 1/3 each) and kept fractions.
    rows = [line for line in card.splitlines() if line.startswith("| 0 |")]
    cells = rows[0].split("|")[3:9]
    weights = [float(c) for c in cells[:3]]
    assert math.isclose(sum(weights), 1.0, abs_tol=0.01) and all(0.2 < w < 0.5 for w in weights)
    assert all(c.strip().endswith("%") for c in cells[3:])
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)  # the embedding takes 5 chunks
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "small"), "--quiet"]) == 0
    assert _shard_bytes(tmp_path / "small") == _shard_bytes(tmp_path / "out")
    capsys.readouterr()


def test_sce_passes_run_side_by_side_and_give_one_workers_bytes(tmp_path, capsys, monkeypatch):
    folders, _ = _family(tmp_path, tunes=3)
    side_by_side, _ordered = run_watched(
        tmp_path, capsys, monkeypatch, "sce", _write(tmp_path, folders)
    )
    assert side_by_side > 0


def test_sce_plan_shows_the_schedule(tmp_path, capsys):
    folders, _ = _family(tmp_path, tunes=3)
    assert cli.main(["plan", str(_write(tmp_path, folders))]) == 0
    out = capsys.readouterr().out
    assert "method: sce" in out and "select_topk:" in out
    assert "| `model.layers.2` | 0.8 |" in out


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("select_topk: [0.2, 0.8]", "select_topk: 1.5 is outside [0, 1]"),
        ("base_model: {m0}\n", "needs a base_model"),
    ],
)
def test_sce_bad_input_is_one_line_exit_2(tmp_path, capsys, edit, needle):
    folders, _ = _family(tmp_path, tunes=3)
    text = CONFIG.replace(*((edit, "select_topk: 1.5") if "topk" in edit else (edit, "")))
    recipe = _write(tmp_path, folders, text)
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@needs_mergekit
def test_sce_agrees_with_mergekit_without_a_selection(tmp_path, capsys):
    """With ``select_topk: 1`` nothing depends on how ties are broken: mergekit's output, within
    one bf16 step (its float32 sums of squares may round a weight's last bit the other way).
    With a selection, mergekit keeps arbitrary elements among variances tied at the threshold;
    the dense reference above is its code with a stable top-k instead."""
    folders, _ = _family(tmp_path, llama=True, tunes=3)
    text = CONFIG.replace("select_topk: [0.2, 0.8], ", "")
    recipe = _write(tmp_path, folders, text)
    ours, theirs = ours_and_mergekits(tmp_path, recipe)
    for name, mine in ours.items():
        assert _max_steps(mine, theirs[name].to(mine.dtype)) <= 1, name
    capsys.readouterr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sce_on_cuda_gives_the_cpu_result(tmp_path, capsys):
    """Without a selection: the CPU's result within one bf16 step (the sums of squares are added
    in another order on the device). With one, CUDA's variances may round differently from the
    CPU's, and so select other elements near the threshold."""
    from tests.test_gpu import _assert_within_one_step

    folders, _ = _family(tmp_path, tunes=3)
    recipe = _write(tmp_path, folders, CONFIG.replace("select_topk: [0.2, 0.8], ", ""))
    cpu, gpu = on_cpu_and_cuda(tmp_path, capsys, recipe)
    for name, tensor in cpu.items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, gpu[name]), name
            continue
        _assert_within_one_step(tensor, gpu[name], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_selection_may_learn_its_count_in_its_first_pass(dtype):
    """RankSelector.set_counts before the first pass ends gives the thresholds of a selector
    made with those counts (the first pass's counters do not depend on them)."""
    from shardmerge.methods.select import RankSelector, key_space, magnitude_keys

    g = torch.Generator().manual_seed(4)
    keys = magnitude_keys((torch.randn(5000, generator=g) * 0.01).to(dtype))
    space = key_space(dtype)
    late, early = RankSelector(5000, (1,), space), RankSelector(5000, (1234,), space)
    for p in range(len(space.digit_shifts)):
        for selector in (late, early):
            for s in range(0, 5000, 1024):
                selector.add(keys[s : s + 1024])
        if p == 0:
            late.set_counts((1234,))
        late.end_pass()
        early.end_pass()
    assert late.thresholds == early.thresholds
    with pytest.raises(AssertionError):
        late.set_counts((7,))  # too late: the first pass is over
