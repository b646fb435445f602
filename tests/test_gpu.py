"""The CUDA path gives the CPU path's result (within one bf16 step). Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from shardmerge.pipeline import prepare, run_merge
from shardmerge.recipe import parse_recipe
from shardmerge.slerp import slerp
from tests.conftest import write_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _one_bf16_step(x: torch.Tensor) -> torch.Tensor:
    # The gap to the next bf16 value above |x|: 2^(exponent - 7).
    mag = x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def _assert_within_one_step(cpu: torch.Tensor, gpu: torch.Tensor, name: str) -> None:
    """CPU and CUDA results agree within one bf16 step of the result, except where the two
    models nearly cancel: there the result is tiny next to the weights, and float32 rounding of
    the two terms (CUDA fuses the multiply-add, the CPU rounds twice) is more than the tiny
    result's own step; such elements agree within 2^-16 of the tensor's RMS (1/256 of a bf16
    step at the weights' scale). benchmarks/compare.py uses the same rule."""
    x, y = cpu.float(), gpu.float()
    diff = (x - y).abs()
    allowed = torch.maximum(_one_bf16_step(cpu), 2**-16 * x.pow(2).mean().sqrt())
    over = diff > allowed
    if over.any():
        worst = int(torch.argmax(diff - allowed))
        raise AssertionError(
            f"{name}: {int(over.sum())} of {x.numel()} elements beyond the bound; e.g. "
            f"cpu {x.view(-1)[worst].item():.6g}, cuda {y.view(-1)[worst].item():.6g}"
        )


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_cuda_matches_cpu(t):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 700, generator=g).to(torch.bfloat16)
    b = (a.float() + 0.5 * torch.randn(3000, 700, generator=g)).to(torch.bfloat16)
    cpu = slerp(a, b, t)
    gpu = slerp(a.cuda(), b.cuda(), t).cpu()
    if t in (0.0, 1.0):
        assert torch.equal(cpu, gpu)
    assert ((cpu.float() - gpu.float()).abs() <= _one_bf16_step(cpu)).all()


def test_engine_cuda_matches_cpu(tmp_path):
    g = torch.Generator().manual_seed(1)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["lm_head.weight"]
    a = {n: torch.randn(1024, 4100, generator=g).to(torch.bfloat16) for n in names}
    b = {
        n: (v.float() + torch.randn(v.shape, generator=g)).to(torch.bfloat16) for n, v in a.items()
    }
    write_checkpoint(tmp_path / "a", a, [names[:2], names[2:]], {"model_type": "llama"})
    write_checkpoint(tmp_path / "b", b, None, {"model_type": "llama"})
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        text = (
            f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\n"
            "t: {default: {gradient: [0, 1]}, non_layer: 0.4}\n"
            f"output: {{dir: {out}, shard_size: 10MB}}\n"
        )
        run_merge(prepare(parse_recipe(text)), out=out, quiet=True, device=device)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        outputs[device] = {}
        for name, file in index["weight_map"].items():
            with safe_open(out / file, framework="pt") as f:
                outputs[device][name] = f.get_tensor(name)
    for name in names:
        cpu, gpu = outputs["cpu"][name], outputs["cuda"][name]
        _assert_within_one_step(cpu, gpu, name)
    # layer 0 has t = 0 and layer 3 has t = 1: exact on both devices
    assert torch.equal(outputs["cuda"][names[0]], a[names[0]])
    assert torch.equal(outputs["cuda"][names[3]], b[names[3]])


def test_registered_slots_write_straight_from_memory_and_match_pinned(tmp_path, monkeypatch):
    """On CUDA the slots come from memory we mapped, registered with CUDA (cudaHostRegister):
    outputs are then written from it (O_DIRECT where the disk allows it) and the files are the
    same bytes as with torch's own pinned slots, and as the CPU's within one bf16 step."""
    import mmap

    from shardmerge import engine
    from shardmerge.engine import execute_plan
    from shardmerge.plan import chunk_buffers
    from shardmerge.shardio import LocalSource

    g = torch.Generator().manual_seed(2)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)] + ["lm_head.weight"]
    a = {n: torch.randn(2048, 4096, generator=g).to(torch.bfloat16) for n in names}
    b = {
        n: (v.float() + torch.randn(v.shape, generator=g)).to(torch.bfloat16) for n, v in a.items()
    }
    write_checkpoint(tmp_path / "a", a, None, {"model_type": "llama"})
    write_checkpoint(tmp_path / "b", b, [names[:1], names[1:]], {"model_type": "llama"})
    text = (
        f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\n"
        "t: {default: {gradient: [0, 0.5, 1]}, non_layer: 0.3}\n"
        f"output: {{dir: {tmp_path / 'unused'}, shard_size: 40MB}}\n"
    )
    plan = prepare(parse_recipe(text)).plan
    registered = []
    real_register = engine._register_pinned

    def spy(pool):
        result = real_register(pool)
        registered.append(result is not None)
        return result

    monkeypatch.setattr(engine, "_register_pinned", spy)
    files = {}
    for mode, device in (("registered", "cuda"), ("pinned", "cuda"), ("cpu", "cpu")):
        out = tmp_path / mode
        out.mkdir()
        memory = None if mode == "pinned" else mmap.mmap(-1, chunk_buffers(plan).total_bytes)
        sources = LocalSource(tmp_path / "a", "model A"), LocalSource(tmp_path / "b", "model B")
        execute_plan(plan, *sources, out, device=device, host_memory=memory)
        files[mode] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert registered == [True]
    assert files["registered"] == files["pinned"]
    for name in names:
        file = next(s.filename for s in plan.shards if any(t.name == name for t in s.tasks))
        with (
            safe_open(tmp_path / "registered" / file, "pt") as gpu_file,
            safe_open(tmp_path / "cpu" / file, "pt") as cpu_file,
        ):
            gpu, cpu = gpu_file.get_tensor(name), cpu_file.get_tensor(name)
        _assert_within_one_step(cpu, gpu, name)
