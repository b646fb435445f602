"""``arcee_fusion``: a dense reference (mergekit 0.1.5's code, with the exact quartiles of the
whole tensor), the order keys behind the quartiles, the CLI, bad input, and mergekit itself
where it is installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from shardmerge import cli, passes
from shardmerge.methods import TensorJob
from shardmerge.methods.arcee_fusion import key_value, order_keys
from tests.conftest import needs_mergekit
from tests.test_methods import (
    _family,
    _read,
    _shard_bytes,
    on_cpu_and_cuda,
    ours_and_mergekits,
    run_watched,
)


def dense_arcee_fusion(
    base: torch.Tensor, model: torch.Tensor, out: torch.dtype | None = None
) -> torch.Tensor:
    """mergekit's arcee_fusion_merge_method, op for op, with its quartiles from a sort of the
    whole tensor (mergekit samples a million elements above a million), and its result rounded
    to ``out`` (default: the inputs' dtype; mergekit's float32 mask leaves it float32)."""
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return (base + (model - base) * mask).to(out or base.dtype)


def _pair(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(*shape, generator=g)
    model = base + 0.05 * torch.randn(*shape, generator=g)
    if len(shape) == 2 and shape[0] > 3:
        model[3] = base[3]  # a row the model left alone: importance 0 there
    return base.to(dtype), model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(40, 130), (3000,), (1,), (2,), (5,), (7, 1)])
def test_arcee_fusion_matches_the_dense_reference_at_any_chunk_size(dtype, shape):
    base, model = _pair(dtype, shape)
    n = base.numel()
    job = TensorJob("model.layers.0.w", n, dtype, ({},), {}, 0, row_len=shape[-1], shape=shape)
    want = dense_arcee_fusion(base, model).reshape(-1)
    for chunk in (130, 1024, 1 << 20):
        got = passes.merge_tensor(job, "arcee_fusion", [base.reshape(-1), model.reshape(-1)], chunk)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (chunk, shape)


@pytest.mark.parametrize("out", [torch.float16, torch.float32])
def test_arcee_fusion_rounds_its_result_once_to_the_output_dtype(out):
    """A bf16 merge written as float16 or float32: mergekit's float32 result, rounded once to
    the output dtype (not first to bf16)."""
    base, model = _pair(torch.bfloat16, (40, 130))
    job = TensorJob("w", base.numel(), torch.bfloat16, ({},), {}, 0, row_len=130, out_dtype=out)
    got = passes.merge_tensor(job, "arcee_fusion", [base.reshape(-1), model.reshape(-1)], 1040)
    want = dense_arcee_fusion(base, model, out).reshape(-1)
    assert got.dtype == out and torch.equal(got, want)
    assert not torch.equal(got, dense_arcee_fusion(base, model).to(out).reshape(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nan_rows", [1, 15])
def test_arcee_fusion_with_nan_rows_matches_the_reference(dtype, nan_rows):
    """A NaN in a row makes its importances NaN: never kept; with a quarter of the rows NaN
    the upper quartile is NaN, so is the threshold, and nothing is kept."""
    base, model = _pair(dtype, (40, 130))
    model[20 : 20 + nan_rows, 5] = float("nan")
    job = TensorJob("w", base.numel(), dtype, ({},), {}, 0, row_len=130, shape=(40, 130))
    want = dense_arcee_fusion(base, model).reshape(-1)
    got = passes.merge_tensor(job, "arcee_fusion", [base.reshape(-1), model.reshape(-1)], 1040)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_order_keys_sort_every_16_bit_pattern_as_torch_sorts_the_values(dtype):
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    keys = order_keys(x)
    by_key = x[torch.sort(keys, stable=True).indices]
    by_value = torch.sort(x, stable=True).values
    # The same values in the same order (NaNs last in both; -0 and +0 equal as values).
    same = (by_key == by_value) | (by_key.isnan() & by_value.isnan())
    assert bool(same.all())
    finite = ~x.isnan()
    back = torch.stack([key_value(int(k), dtype) for k in keys[finite][::97]])
    assert torch.equal(back.view(torch.int16), x[finite][::97].view(torch.int16))


def test_order_keys_of_float32_follow_the_values():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(5000, generator=g) * 10.0 ** torch.randint(-30, 30, (5000,))])
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])])
    keys = order_keys(x)
    order = torch.sort(keys, stable=True).indices
    by_value = torch.sort(x, stable=True).values
    assert torch.equal(x[order][:-1], by_value[:-1]) and x[order][-1].isnan()
    for i in (0, 17, 4999, 5002):
        assert torch.equal(key_value(int(keys[i]), torch.float32), x[i])


CONFIG = "merge_method: arcee_fusion\nbase_model: {m0}\nmodels:\n  - model: {m1}\ndtype: bfloat16\n"


def _write(tmp_path, folders, text=CONFIG):
    recipe = tmp_path / "merge.yml"
    recipe.write_text(text.format(**{f"m{j}": f for j, f in enumerate(folders)}))
    return recipe


def test_arcee_fusion_config_runs_matches_the_reference_and_counts_what_it_took(
    tmp_path, capsys, monkeypatch
):
    folders, states = _family(tmp_path)
    recipe = _write(tmp_path, folders)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    for name, base in states[0].items():
        if not base.is_floating_point():
            assert torch.equal(got[name], base), name
            continue
        assert torch.equal(got[name], dense_arcee_fusion(base, states[1][name])), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`arcee_fusion` merge of 2 checkpoints" in card
    row = next(line for line in card.splitlines() if line.startswith("| 0 |"))
    assert row.split("|")[3].strip().endswith("%")  # the share that took the model's value
    assert "weight" not in card.split("## What the merge saw")[1].split("\n\n")[1]
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)  # the embedding takes 5 chunks
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "small"), "--quiet"]) == 0
    assert _shard_bytes(tmp_path / "small") == _shard_bytes(tmp_path / "out")
    capsys.readouterr()


def test_arcee_fusion_passes_run_side_by_side_and_give_one_workers_bytes(
    tmp_path, capsys, monkeypatch
):
    folders, _ = _family(tmp_path)
    side_by_side, _ordered = run_watched(
        tmp_path, capsys, monkeypatch, "arcee_fusion", _write(tmp_path, folders)
    )
    assert side_by_side > 0


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("  - model: {m1}\n", "  - model: {m1}\n  - model: {m2}\n"),
        ("base_model: {m0}\n", ""),
    ],
)
def test_arcee_fusion_bad_input_is_one_line_exit_2(tmp_path, capsys, edit, needle):
    folders, _ = _family(tmp_path)
    recipe = _write(tmp_path, folders, CONFIG.replace(edit, needle))
    rc = cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "arcee_fusion" in err and len(err.strip().splitlines()) == 1, err
    assert ("exactly 1" in err) if needle else ("base_model" in err), err
    assert not (tmp_path / "out").exists()


@needs_mergekit
@pytest.mark.parametrize(
    "dtype", ["bfloat16", "float32", "bfloat16\nout_dtype: float16", "float16\nout_dtype: float32"]
)
def test_arcee_fusion_agrees_with_mergekit(tmp_path, capsys, dtype):
    """Every tensor here has under a million elements, so mergekit's quartiles are exact too:
    its values, bit for bit, once its float32 output (its float32 mask promotes the result) is
    rounded to the merge dtype; with an output dtype, both round it once to that."""
    folders, _ = _family(tmp_path, llama=True)
    recipe = _write(tmp_path, folders, CONFIG.replace("bfloat16", dtype))
    ours, theirs = ours_and_mergekits(tmp_path, recipe)
    for name, mine in ours.items():
        assert torch.equal(mine, theirs[name].to(mine.dtype)), name
    capsys.readouterr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_arcee_fusion_on_cuda_takes_nearly_the_cpus_elements(tmp_path, capsys):
    """CUDA's softmax and sums round differently, so an importance next to the threshold may
    fall on the other side of it: almost every element must still be the CPU's."""
    folders, _ = _family(tmp_path)
    recipe = _write(tmp_path, folders)
    cpu, gpu = on_cpu_and_cuda(tmp_path, capsys, recipe)
    total = differ = 0
    for name, tensor in cpu.items():
        total += tensor.numel()
        differ += int((tensor != gpu[name]).sum())
    assert differ <= total // 1000, (differ, total)
