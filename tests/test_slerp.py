"""The SLERP math in shardmerge/slerp.py, against an independent float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shardmerge.slerp import SlerpStats, accumulate, coefficients, slerp

SIN_QUARTER_PI = math.sin(math.pi / 4)  # the documented 0.7071 for a zero end at t=0.5


def reference_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP written out in float64, independently of shardmerge.slerp."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    norm_a, norm_b = float(a64.norm()), float(b64.norm())
    unit_a = a64 / norm_a if norm_a > 1e-8 else a64
    unit_b = b64 / norm_b if norm_b > 1e-8 else b64
    dot = float(unit_a @ unit_b)
    if abs(dot) > 0.9995:
        merged = (1 - t) * a64 + t * b64
    else:
        theta = math.acos(dot)
        merged = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return merged.reshape(a.shape)


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between adjacent ``dtype`` values at |x| (one rounding step)."""
    info = torch.finfo(dtype)
    magnitude = x.double().abs().clamp_min(info.tiny)
    return info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_endpoints_are_the_inputs_bit_for_bit(dtype: torch.dtype) -> None:
    a, b = randn(17, 9, seed=0, dtype=dtype), randn(17, 9, seed=1, dtype=dtype)
    for t, end in ((0, a), (0.0, a), (1, b), (1.0, b)):
        result = slerp(a, b, t)
        assert result.dtype == dtype
        assert torch.equal(result, end)
        assert result.data_ptr() != end.data_ptr()  # a new tensor, never the input itself


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_identical_tensors_give_the_tensor(t: float) -> None:
    a = randn(50, 20, seed=2)
    result = slerp(a, a.clone(), t)
    torch.testing.assert_close(result, a, rtol=1e-6, atol=1e-7)
    if t == 0.5:
        assert torch.equal(result, a)  # 0.5*a + 0.5*a is exact in binary


def test_parallel_tensors_interpolate_linearly() -> None:
    a = randn(40, seed=3)
    result = slerp(a, 3 * a, 0.25)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, 1.5 * a)


def test_antipodal_tensors_meet_at_zero() -> None:
    a = randn(40, seed=4)
    assert torch.equal(slerp(a, -a, 0.5), torch.zeros_like(a))
    torch.testing.assert_close(slerp(a, -a, 0.25), 0.5 * a)


def test_zero_tensor_is_not_normalised() -> None:
    b = randn(30, seed=5)
    zero = torch.zeros_like(b)
    torch.testing.assert_close(slerp(zero, b, 0.5), SIN_QUARTER_PI * b)
    torch.testing.assert_close(slerp(b, zero, 0.5), SIN_QUARTER_PI * b)
    t = 0.2  # dot = 0, theta = pi/2: cos(t*pi/2)*a + sin(t*pi/2)*b
    torch.testing.assert_close(slerp(zero, b, t), math.sin(t * math.pi / 2) * b)
    assert torch.equal(slerp(zero, zero, 0.5), zero)


def test_zero_dim_tensors_are_one_element_vectors() -> None:
    two, three = torch.tensor(2.0), torch.tensor(3.0)
    assert slerp(two, three, 0.5).shape == ()
    torch.testing.assert_close(slerp(two, three, 0.5), torch.tensor(2.5))  # parallel -> lerp
    torch.testing.assert_close(slerp(two, -three, 0.5), torch.tensor(-0.5))  # antipodal -> lerp
    torch.testing.assert_close(slerp(torch.tensor(0.0), three, 0.5), SIN_QUARTER_PI * three)


def test_symmetric_in_the_ends() -> None:
    a, b = randn(64, 32, seed=6), randn(64, 32, seed=7)
    for t in (0.1, 0.5, 0.8):
        torch.testing.assert_close(slerp(a, b, t), slerp(b, a, 1 - t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(), (7,), (64, 33), (3, 5, 8, 8), (5000,)])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("correlated", [False, True])
def test_matches_float64_reference(shape: tuple[int, ...], t: float, correlated: bool) -> None:
    a = randn(*shape, seed=8)
    noise = randn(*shape, seed=9)
    # Independent tensors are ~orthogonal; a + 0.5*noise sits at a mid angle from a.
    b = a + 0.5 * noise if correlated else noise
    expected = reference_slerp(a, b, t)
    result = slerp(a, b, t)
    assert result.dtype == torch.float32 and result.shape == a.shape
    scale = float(expected.abs().max())
    torch.testing.assert_close(result.double(), expected, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_one_step_of_reference(dtype: torch.dtype) -> None:
    a, b = randn(96, 80, seed=10, dtype=dtype), randn(96, 80, seed=11, dtype=dtype)
    for t in (0.3, 0.5):
        result = slerp(a, b, t)
        assert result.dtype == dtype
        expected = reference_slerp(a, b, t).to(dtype)
        error = (result.double() - expected.double()).abs()
        # Plus float32 noise where a and b cancel: the reference's exact 0 may come out as ~1e-8.
        slack = 1e-6 * float(expected.abs().max())
        assert (error <= spacing(expected, dtype) + slack).all()
        assert float((error == 0).double().mean()) > 0.99  # nearly all round like the reference


def test_chunked_matches_unchunked() -> None:
    a, b = randn(100_003, seed=12), randn(100_003, seed=13)
    whole = slerp(a, b, 0.3)
    chunked = slerp(a, b, 0.3, chunk_numel=1000)  # 101 chunks, the last one ragged
    # Not bit-exact by design: 1000-element chunks are below the 4096-element float32 block, so
    # their sums are taken in float64, while the unchunked pass sums whole blocks in float32. The
    # stats then agree to ~1e-7 relative, so s0 and s1 (and the result) may differ in the last bits.
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked.double(), reference_slerp(a, b, 0.3), rtol=1e-6, atol=1e-6)


def test_float64_accumulation_where_float32_summation_drifts() -> None:
    # 8 Mi near-constant values: a sequential float32 running sum reaches ~8e6, where its spacing
    # (0.5) swallows much of each ~1.0 addend, so its dot and norms are visibly wrong.
    n = 1 << 23
    g = torch.Generator().manual_seed(14)
    a = 1.0 + 0.01 * torch.rand(n, generator=g)
    b = a.clone()
    b[n // 2 :] = -0.5 - 0.01 * torch.rand(n - n // 2, generator=g)
    a64, b64 = a.double(), b.double()
    exact = SlerpStats(float(a64 @ b64), float(a64 @ a64), float(b64 @ b64))

    def naive_float32(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(np.cumsum((x * y).numpy(), dtype=np.float32)[-1])  # sequential float32

    naive = SlerpStats(naive_float32(a, b), naive_float32(a, a), naive_float32(b, b))
    t = 0.5
    assert abs(coefficients(naive, t)[0] - coefficients(exact, t)[0]) > 1e-3

    ours = SlerpStats()
    accumulate(ours, a, b)
    for got, want in ((ours.dot, exact.dot), (ours.sq_a, exact.sq_a), (ours.sq_b, exact.sq_b)):
        assert got == pytest.approx(want, rel=1e-7)  # float32 blocks of 4096: ~1e-9 off
    s0, s1 = coefficients(exact, t)
    expected = s0 * a64 + s1 * b64
    # One float32 rounding of values up to ~1.25 is ~6e-8; a coefficient off by 1e-5 would show.
    assert float((slerp(a, b, t).double() - expected).abs().max()) < 2e-7


def test_integer_tensors_take_the_rounded_lerp() -> None:
    a = torch.tensor([0, 10, -5, 7], dtype=torch.int32)
    b = torch.tensor([10, 20, 5, 7], dtype=torch.int32)
    result = slerp(a, b, 0.3)
    assert result.dtype == torch.int32
    assert result.tolist() == [3, 13, -2, 7]
    # Ends are returned as is, even where float64 could not hold the value.
    big_a = torch.tensor([2**62 + 1, -3])
    big_b = torch.tensor([5, 2**61 + 1])
    assert torch.equal(slerp(big_a, big_b, 0), big_a)
    assert torch.equal(slerp(big_a, big_b, 1), big_b)
    steps = slerp(torch.tensor(100), torch.tensor(200), 0.5)  # num_batches_tracked-like 0-dim
    assert steps.dtype == torch.int64 and steps.shape == () and int(steps) == 150


def test_bool_tensors_come_from_the_nearer_end() -> None:
    a = torch.tensor([True, False, True])
    b = torch.tensor([False, True, True])
    assert torch.equal(slerp(a, b, 0.49), a)
    assert torch.equal(slerp(a, b, 0.5), a)  # a tie goes to the first model
    assert torch.equal(slerp(a, b, 0.51), b)


def test_non_float_result_lives_on_the_first_tensors_device() -> None:
    a = torch.zeros(3, dtype=torch.int64, device="meta")
    assert slerp(a, torch.ones(3, dtype=torch.int64), 1.0).device.type == "meta"
    flags = torch.zeros(3, dtype=torch.bool, device="meta")
    assert slerp(flags, torch.ones(3, dtype=torch.bool), 0.7).device.type == "meta"


def test_parameters_merge_without_autograd() -> None:
    # pytest turns warnings into errors: reading sums of grad-tracking tensors used to warn.
    a = torch.nn.Parameter(randn(10, 4, seed=21))
    b = torch.nn.Parameter(randn(10, 4, seed=22))
    for t in (0, 0.5, 1):
        result = slerp(a, b, t)
        assert not result.requires_grad and result.grad_fn is None
        assert torch.equal(result, slerp(a.detach(), b.detach(), t))


def test_non_contiguous_inputs() -> None:
    transposed = randn(33, 64, seed=15).t()
    other = randn(64, 33, seed=16)
    assert not transposed.is_contiguous()
    result = slerp(transposed, other, 0.4)
    assert result.shape == (64, 33)
    assert torch.equal(result, slerp(transposed.contiguous(), other, 0.4))

    a = randn(2, 3, 4, 5, seed=17).to(memory_format=torch.channels_last)
    b = randn(2, 3, 4, 5, seed=18).to(memory_format=torch.channels_last)
    assert not a.is_contiguous()
    result = slerp(a, b, 0.4)
    assert torch.equal(result, slerp(a.contiguous(), b.contiguous(), 0.4))
    assert torch.equal(slerp(a, b, 0), a)


def test_out_dtype() -> None:
    a, b = randn(20, 10, seed=19), randn(20, 10, seed=20)
    result = slerp(a, b, 0.4, out_dtype=torch.bfloat16)
    assert result.dtype == torch.bfloat16
    # Computed in float32, then rounded once into the output.
    assert torch.equal(result, slerp(a, b, 0.4).to(torch.bfloat16))
    assert torch.equal(slerp(a, b, 0, out_dtype=torch.float16), a.to(torch.float16))
    assert torch.equal(slerp(a, b, 1, out_dtype=torch.float16), b.to(torch.float16))


def test_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match=r"shapes differ: \(2, 3\) vs \(3, 2\)"):
        slerp(torch.zeros(2, 3), torch.zeros(3, 2), 0.5)
    with pytest.raises(ValueError, match="cannot merge"):
        slerp(torch.zeros(3), torch.zeros(3, dtype=torch.int64), 0.5)


@pytest.mark.parametrize("t", ["0.5", None, True, False, torch.tensor(0.5)])
def test_rejects_non_numeric_t(t: object) -> None:
    with pytest.raises(TypeError, match="t must be"):
        slerp(torch.ones(3), torch.ones(3), t)  # type: ignore[arg-type]


@pytest.mark.parametrize("t", [-0.01, 1.01, math.nan, math.inf, -math.inf, 2])
def test_rejects_t_outside_unit_interval(t: float) -> None:
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        slerp(torch.ones(3), torch.ones(3), t)
