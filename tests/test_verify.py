"""``shardmerge verify``: whole, finite, consistent outputs pass; every kind of damage is named."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from shardmerge import cli
from shardmerge.pipeline import prepare, run_merge
from shardmerge.recipe import load_recipe
from tests.conftest import write_checkpoint

INDEX = "model.safetensors.index.json"
Q1 = "model.layers.1.self_attn.q_proj.weight"


def _tensors(seed: int, layers: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(24, 8, generator=g)}
    for i in range(layers):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(16, 8, generator=g)
    t["lm_head.weight"] = torch.randn(24, 8, generator=g)
    return t


def _merge(root: Path, layers: int) -> tuple[Path, Path]:
    """Merge a tiny pair into ``root/out``; returns (output, recipe)."""
    config = {"tie_word_embeddings": False}
    write_checkpoint(root / "a", _tensors(0, layers), None, config)
    write_checkpoint(root / "b", _tensors(1, layers), None, config)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"models: {{a: {root / 'a'}, b: {root / 'b'}}}\nt: 0.3\n"
        f"output: {{dir: {root / 'out'}, shard_size: 2KB}}\n"
    )
    run_merge(prepare(load_recipe(recipe)), out=root / "out", quiet=True, device="cpu")
    return root / "out", recipe


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 tensors in several shards: more than the 8 tensors ``--recipe`` samples."""
    out, recipe = _merge(tmp_path_factory.mktemp("verify"), layers=5)
    assert len(json.loads((out / INDEX).read_text())["weight_map"]) == 12
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out, recipe


@pytest.fixture
def out(merged: tuple[Path, Path], tmp_path: Path) -> Path:
    """A fresh copy of the good output, to damage."""
    return Path(shutil.copytree(merged[0], tmp_path / "out"))


def _verify(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = cli.main(["verify", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return rc, captured.out


def _locate(out: Path, name: str) -> tuple[Path, int, dict]:
    """(shard, absolute offset of the tensor's bytes, header entry)."""
    file = json.loads((out / INDEX).read_text())["weight_map"][name]
    data = (out / file).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8 : 8 + length])[name]
    return out / file, 8 + length + entry["data_offsets"][0], entry


def _put_float32(out: Path, name: str, element: int, value: float) -> None:
    shard, offset, entry = _locate(out, name)
    assert entry["dtype"] == "F32"
    with shard.open("r+b") as fh:
        fh.seek(offset + 4 * element)
        fh.write(struct.pack("<f", value))


def _edit_index(out: Path, edit) -> None:  # type: ignore[no-untyped-def]
    index = json.loads((out / INDEX).read_text())
    edit(index)
    (out / INDEX).write_text(json.dumps(index))


def test_good_output_passes(capsys, merged):
    rc, text = _verify(capsys, merged[0])
    assert rc == 0
    assert text.startswith(f"ok: {merged[0]}: 12 tensors")


def test_recipe_recomputes_a_sample_and_full_recomputes_all(capsys, merged):
    rc, text = _verify(capsys, merged[0], "--recipe", merged[1])
    assert rc == 0, text
    assert "8 recomputed" in text
    rc, text = _verify(capsys, merged[0], "--recipe", merged[1], "--full")
    assert rc == 0, text
    assert "12 recomputed" in text


def _first_shard(out: Path) -> str:
    return min(json.loads((out / INDEX).read_text())["weight_map"].values())


def test_missing_shard(capsys, out):
    shard = _first_shard(out)
    (out / shard).unlink()
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert text.startswith("FAILED")
    assert f"{shard}: missing" in text
    assert len(text.strip().splitlines()) == 2  # the summary, then one problem


def test_index_names_a_tensor_its_shard_lacks(capsys, out):
    shard = _first_shard(out)
    _edit_index(out, lambda i: i["weight_map"].update({"ghost.weight": shard}))
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert f"'ghost.weight' is not in {shard}" in text


def test_wrong_total_size(capsys, out):
    _edit_index(out, lambda i: i["metadata"].update({"total_size": 12345}))
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert "total_size 12345 but tensors hold" in text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value(capsys, out, value):
    _put_float32(out, Q1, 5, value)
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert f"tensor {Q1!r} contains NaN or Inf" in text


def test_corrupt_header(capsys, out):
    shard, _, _ = _locate(out, Q1)
    data = bytearray(shard.read_bytes())
    data[8] = ord("]")
    shard.write_bytes(bytes(data))
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert f"{shard.name}: header is not valid JSON" in text


def test_index_pointing_outside_the_folder(capsys, out):
    _edit_index(out, lambda i: i["weight_map"].update({Q1: "../elsewhere.safetensors"}))
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert "'../elsewhere.safetensors' escapes" in text


def test_recipe_sample_catches_a_tampered_value(capsys, tmp_path):
    out, recipe = _merge(tmp_path, layers=2)  # 6 tensors: the sample is all of them
    rc, text = _verify(capsys, out, "--recipe", recipe)
    assert rc == 0, text
    _put_float32(out, Q1, 0, 0.125)  # finite and plausible: only digests and recomputation see it
    assert _verify(capsys, out, "--fast")[0] == 0
    rc, text = _verify(capsys, out, "--recipe", recipe)
    assert rc == 1
    assert f"tensor {Q1!r} differs from what the recipe makes" in text


def test_full_catches_a_tampered_value(capsys, out, merged):
    for name in json.loads((out / INDEX).read_text())["weight_map"]:
        tampered = out / "t"
        shutil.rmtree(tampered, ignore_errors=True)
        shutil.copytree(out, tampered, ignore=shutil.ignore_patterns("t"))
        _put_float32(tampered, name, 0, 0.125)
        rc, text = _verify(capsys, tampered, "--recipe", merged[1], "--full")
        assert rc == 1, name
        assert f"tensor {name!r} differs from what the recipe makes" in text


def test_full_needs_a_recipe(capsys, out):
    rc = cli.main(["verify", str(out), "--full"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "error: --full recomputes tensors from the inputs: it needs --recipe"


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bad_path_is_bad_input(capsys, tmp_path, kind):
    target = tmp_path / "nowhere"
    if kind == "file":
        target.write_text("not a model")
    rc = cli.main(["verify", str(target)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    reason = "no such folder" if kind == "missing" else "is not a folder"
    assert captured.err == f"error: {target}: {reason}\n"


def test_flipped_bytes_are_found_by_the_recorded_digests(capsys, out):
    index = json.loads((out / INDEX).read_text())
    digests = index["metadata"]["shardmerge"]["shard_digests"]
    assert set(digests) == set(index["weight_map"].values())
    shard, offset, _ = _locate(out, Q1)
    data = bytearray(shard.read_bytes())
    data[offset : offset + 16] = bytes(b ^ 0x01 for b in data[offset : offset + 16])  # low bits
    shard.write_bytes(bytes(data))
    rc, text = _verify(capsys, out)
    assert rc == 1
    assert f"{shard.name}: its bytes differ from the digest recorded" in text
    assert len(text.strip().splitlines()) == 2
    rc, text = _verify(capsys, out, "--fast")  # headers and NaN/Inf only: the flip passes
    assert rc == 0, text


def test_good_output_checks_every_digest(capsys, merged):
    rc, text = _verify(capsys, merged[0])
    shards = len(set(json.loads((merged[0] / INDEX).read_text())["weight_map"].values()))
    assert rc == 0
    assert f"{shards} shard digest(s) checked" in text


def test_single_file_model_folder(capsys, tmp_path):
    folder = write_checkpoint(tmp_path / "single", _tensors(0, 2), None, {"model_type": "llama"})
    rc, text = _verify(capsys, folder)
    assert rc == 0, text
    assert text.startswith(f"ok: {folder}: 6 tensors")
    _put_single_nan(folder / "model.safetensors", Q1)
    rc, text = _verify(capsys, folder)
    assert rc == 1
    assert f"tensor {Q1!r} contains NaN or Inf" in text


def _put_single_nan(path: Path, name: str) -> None:
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    begin = 8 + length + json.loads(data[8 : 8 + length])[name]["data_offsets"][0]
    data[begin : begin + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
