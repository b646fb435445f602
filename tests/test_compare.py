"""``shardmerge compare``: the statistics against a dense float64 computation, grouping, output
formats, the plot, and bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from shardmerge import compare, similarity
from shardmerge.cli import main
from tests.conftest import folder_files, write_checkpoint

SHAPES = {
    "model.embed_tokens.weight": (40, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.layers.1.post_attention_layernorm.weight": (8,),
    "model.norm.weight": (8,),
    "lm_head.weight": (40, 8),
}
CONFIG = {"model_type": "llama", "tie_word_embeddings": False}


def _models(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], ...]:
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    a = {n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in base.items()}
    b = {n: v + 0.5 * torch.randn(v.shape, generator=g) for n, v in base.items()}
    return tuple({n: v.to(dtype) for n, v in m.items()} for m in (a, b, base))


def _write(tmp_path: Path, models: tuple[dict[str, torch.Tensor], ...]) -> list[Path]:
    a, b, base = models
    names = list(a)
    write_checkpoint(tmp_path / "a", a, [names[:4], names[4:]], CONFIG)
    write_checkpoint(tmp_path / "b", b, None, CONFIG)
    write_checkpoint(tmp_path / "base", base, [names[::2], names[1::2]], CONFIG)
    return [tmp_path / "a", tmp_path / "b", tmp_path / "base"]


def _dense(tensors: list[torch.Tensor]) -> dict[str, float]:
    """The statistics of concatenated tensors, computed directly in float64."""
    a, b, base = (torch.cat([t.reshape(-1).double() for t in group]) for group in tensors)
    ta, tb = a - base, b - base
    product = ta * tb
    return {
        "cosine": float(a @ b / (a.norm() * b.norm())),
        "rel_l2": float((a - b).norm() / a.norm()),
        "task_cosine": float(ta @ tb / (ta.norm() * tb.norm())),
        "sign_agreement": float((product > 0).sum() / (product != 0).sum()),
    }


def _close(sums: similarity.Sums, expected: dict[str, float], tol: float = 1e-6) -> None:
    got = sums.metrics(with_base=True)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=tol, abs=tol), key


@pytest.mark.parametrize("sub", [0, similarity.BLOCK, 3 * similarity.BLOCK])
def test_chunked_sums_equal_the_dense_computation(sub: int) -> None:
    g = torch.Generator().manual_seed(3)
    n = 5 * similarity.BLOCK + 123  # several pieces and a padded last block
    base = torch.randn(n, generator=g)
    a = (base + 0.2 * torch.randn(n, generator=g)).bfloat16()
    b = base + 0.4 * torch.randn(n, generator=g)
    a[:50] = base[:50]  # task vector exactly zero here: left out of the sign agreement
    sums = similarity.Sums()
    scratch = similarity.scratch_buffer(sub or n)
    for s in range(0, n, 7000):  # chunks that do not line up with the pieces
        e = min(s + 7000, n)
        similarity.accumulate(sums, a[s:e], b[s:e], base[s:e], scratch, sub=sub)
    assert sums.numel == n
    _close(sums, _dense([[a], [b], [base]]))


def test_identical_models_and_zero_tensors() -> None:
    x = torch.randn(1000)
    sums = similarity.Sums()
    similarity.accumulate(sums, x, x, x * 0.5, similarity.scratch_buffer(1000))
    assert sums.cosine == pytest.approx(1.0) and sums.rel_l2 == 0.0
    assert sums.task_cosine == pytest.approx(1.0) and sums.sign_agreement == 1.0
    zeros = similarity.Sums()
    similarity.accumulate(zeros, torch.zeros(10), x[:10], None, similarity.scratch_buffer(10))
    assert zeros.cosine is None and zeros.rel_l2 is None and zeros.sign_agreement is None


def test_module_types() -> None:
    kinds = {
        "model.layers.3.self_attn.k_proj.weight": "attention",
        "transformer.h.0.attn.c_attn.weight": "attention",
        "model.layers.3.mlp.gate_proj.weight": "mlp",
        "model.layers.3.block_sparse_moe.experts.0.w1.weight": "other",
        "model.layers.3.post_attention_layernorm.weight": "norms",
        "model.layers.3.self_attn.q_norm.weight": "norms",
        "transformer.ln_f.weight": "norms",
        "model.embed_tokens.weight": "embeddings",
        "lm_head.weight": "embeddings",
    }
    assert {n: similarity.module_type(n) for n in kinds} == kinds


def test_compare_streams_every_tensor_in_small_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per tensor, per layer x module type, per layer, per type and overall, each the dense
    statistics of the tensors concatenated; chunks far smaller than the tensors."""
    monkeypatch.setattr(compare, "CHUNK_NUMEL", 48)
    monkeypatch.setattr(similarity, "BLOCK", 16)
    monkeypatch.setattr(similarity, "SUB_NUMEL", 32)
    models = _models(dtype=torch.bfloat16)
    paths = _write(tmp_path, models)
    result, warnings = compare.compare_models([str(p) for p in paths], device="cpu")
    assert warnings == []
    a, b, base = models

    def group(names: list[str]) -> list[list[torch.Tensor]]:
        return [[m[n] for n in names] for m in (a, b, base)]

    assert sorted(t.name for t in result.tensors) == sorted(a)
    for t in result.tensors:
        _close(t.sums, _dense(group([t.name])))
    assert [(ly.stack, ly.index) for ly in result.layers] == [
        ("model.layers", 0),
        ("model.layers", 1),
    ]
    layer1 = [n for n in SHAPES if ".layers.1." in n]
    _close(result.layers[1].total, _dense(group(layer1)))
    _close(result.layers[1].by_type["norms"], _dense(group([layer1[2]])))
    _close(
        result.by_type["embeddings"], _dense(group(["model.embed_tokens.weight", "lm_head.weight"]))
    )
    _close(result.total, _dense(group(list(SHAPES))))


def test_compute_threads_give_one_threads_sums_whatever_order_chunks_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks summed by two threads, every other one slowed so that they finish out of order:
    each tensor's sums are those of one thread, bit for bit (added in chunk order)."""
    monkeypatch.setattr(compare, "CHUNK_NUMEL", 48)
    monkeypatch.setattr(similarity, "BLOCK", 16)
    monkeypatch.setattr(similarity, "SUB_NUMEL", 32)
    g = torch.Generator().manual_seed(5)
    # Chunks of very different magnitudes: their float64 sums depend on the order they are added.
    scale = torch.exp(4 * torch.randn(40, 1, generator=g)).expand(40, 48).reshape(-1)
    models = tuple(
        {n: torch.randn(48 * 40, generator=g) * scale for n in ("x.weight", "y.weight")}
        for _ in range(3)
    )
    paths = []
    for key, tensors in zip(("a", "b", "base"), models, strict=True):
        write_checkpoint(tmp_path / key, tensors, None, CONFIG)
        paths.append(str(tmp_path / key))
    monkeypatch.setattr(compare, "CPU_WORKERS", 1)
    one, _ = compare.compare_models(paths, device="cpu")

    real = similarity.accumulate
    calls = iter(range(1 << 30))

    def uneven(*args: object, **kwargs: object) -> None:
        if next(calls) % 2 == 0:
            time.sleep(0.002)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(similarity, "accumulate", uneven)
    monkeypatch.setattr(compare, "CPU_WORKERS", 2)
    two, _ = compare.compare_models(paths, device="cpu")
    assert [(t.name, t.sums) for t in two.tensors] == [(t.name, t.sums) for t in one.tensors]
    assert two.total == one.total


def test_cli_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, base = (str(p) for p in _write(tmp_path, _models()))
    assert main(["compare", a, b, "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("layer"))
    assert " ".join(header.split()) == "layer cos attention cos mlp cos norms cos all rel L2"
    assert "task cos" not in table and "lm_head.weight" in table

    assert main(["compare", a, b, "--base", base, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["models"]) == {"a", "b", "base"}
    assert [ly["layer"] for ly in data["layers"]] == [0, 1]
    assert set(data["layers"][0]) == {"stack", "layer", "all", "attention", "mlp", "norms"}
    by_name = {t["name"]: t for t in data["tensors"]}
    ma, mb, mbase = _models()
    name = "model.layers.0.mlp.up_proj.weight"
    expected = _dense([[ma[name]], [mb[name]], [mbase[name]]])
    for key, value in expected.items():
        assert by_name[name][key] == pytest.approx(value, rel=1e-6)
    assert data["overall"]["numel"] == sum(math.prod(s) for s in SHAPES.values())


def test_tied_embeddings_and_integer_buffers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = torch.Generator().manual_seed(1)
    a = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.steps": torch.tensor([3]),
    }
    b = {**a, "model.embed_tokens.weight": torch.randn(10, 4, generator=g)}
    b["lm_head.weight"] = torch.randn(10, 4, generator=g)  # B unties, A ties: follow A
    write_checkpoint(tmp_path / "a", a, None, {"tie_word_embeddings": True})
    write_checkpoint(tmp_path / "b", b, None, {"tie_word_embeddings": False})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [t["name"] for t in data["tensors"]] == ["model.embed_tokens.weight"]
    assert data["skipped_non_float"] == ["model.steps"]
    assert "lm_head.weight" in captured.err  # the warning


def test_plot_is_a_valid_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    paths = _write(tmp_path, _models())
    for extra in ([], ["--base", str(paths[2])]):
        out = tmp_path / f"plot{len(extra)}.png"
        assert main(["compare", str(paths[0]), str(paths[1]), *extra, "--plot", str(out)]) == 0
        image = imread(out)
        assert image.shape[0] > 300 and image.shape[1] > 2 * image.shape[0]
        assert image[..., :3].std() > 0.05  # not blank
    assert "plot written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["plot0.png", "plot2.png"]


def test_plot_without_matplotlib_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _write(tmp_path, _models())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    out = tmp_path / "p.png"
    assert main(["compare", str(paths[0]), str(paths[1]), "--plot", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        'error: --plot needs matplotlib: pip install "shardmerge[plot]" (or pip install matplotlib)'
    )
    assert captured.out == "" and not out.exists()


def test_bad_inputs_exit_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, base = _models()
    paths = _write(tmp_path, (a, b, base))
    out = tmp_path / "p.png"

    def run(*args: str) -> str:
        assert main(["compare", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and not out.exists()
        return captured.err

    err = run(str(paths[0]), str(tmp_path / "missing"))
    assert "is not a folder and not a Hub repo id" in err
    bad = dict(b, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(8, 16)})
    write_checkpoint(tmp_path / "bad", bad, None, CONFIG)
    err = run(str(paths[0]), str(tmp_path / "bad"))
    assert "'model.layers.1.mlp.up_proj.weight': shape [16, 8] in model A" in err
    nan = dict(base, **{"model.norm.weight": torch.full((8,), math.nan)})
    write_checkpoint(tmp_path / "nan", nan, None, CONFIG)
    err = run(str(paths[0]), str(paths[1]), "--base", str(tmp_path / "nan"), "--plot", str(out))
    assert err.strip() == (
        f"error: model BASE ({tmp_path / 'nan'}): tensor 'model.norm.weight' contains NaN or Inf values"
    )
    (paths[1] / "model.safetensors").write_bytes(b"\x01")
    err = run(str(paths[0]), str(paths[1]))
    assert "model.safetensors: too short to be a safetensors file" in err
    err = run(str(paths[0]), str(paths[2]), "--plot", str(tmp_path / "nowhere" / "p.png"))
    assert "does not exist" in err


def test_compare_hub_models_with_stream(
    fake_hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _write(tmp_path, _models())
    sha = fake_hub.add_repo("org/a", folder_files(paths[0]))
    fake_hub.add_repo("org/b", folder_files(paths[1]))
    assert main(["compare", str(paths[0]), str(paths[1]), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    for stream in (["--stream"], []):  # shard by shard into a scratch folder, or the HF cache
        assert main(["compare", f"org/a@{sha}", "org/b", "--json", *stream]) == 0
        hub = json.loads(capsys.readouterr().out)
        assert hub["tensors"] == local["tensors"]
        assert hub["models"]["a"] == f"model A (org/a@{sha[:12]})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_statistics(tmp_path: Path) -> None:
    paths = [str(p) for p in _write(tmp_path, _models(dtype=torch.bfloat16))]
    cpu, _ = compare.compare_models(paths, device="cpu")
    gpu, _ = compare.compare_models(paths, device="cuda")
    for x, y in zip(cpu.tensors, gpu.tensors, strict=True):
        assert x.name == y.name
        assert (x.sums.sign_agree, x.sums.sign_total) == (y.sums.sign_agree, y.sums.sign_total)
        for key, value in x.sums.metrics(with_base=True).items():
            assert y.sums.metrics(with_base=True)[key] == pytest.approx(value, rel=1e-5), key
