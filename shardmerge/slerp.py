"""The one SLERP implementation, shared by the nn.Module API, the streaming engine and the GPU path.

Semantics follow mergekit's ``slerp`` so existing recipes reproduce the same models: the whole
tensor is one vector; copies are normalised by their global L2 norm only above ``NORM_EPS``; when
the normalised directions are (anti)parallel (``|dot| > DOT_THRESHOLD``) the raw tensors are
linearly interpolated; otherwise ``s0*a + s1*b`` on the raw tensors with the classic weights.

Documented edge cases (all finite):

* identical or parallel tensors: ``|dot| = 1`` -> lerp, so ``slerp(a, a, t) == a``;
* antipodal tensors (``b = -a``): lerp, so t=0.5 gives zeros;
* a zero (or norm <= 1e-8) tensor is not normalised, so ``dot = 0``, ``theta = pi/2`` and the
  result is ``cos(t*pi/2)*a + sin(t*pi/2)*b`` (mergekit's behaviour; t=0.5 with a zero ``a``
  gives ``0.707*b``);
* 0-dim tensors are one-element vectors;
* t=0 returns ``a`` and t=1 returns ``b`` bit for bit (cast to the output dtype);
* integer tensors (e.g. BatchNorm's ``num_batches_tracked``) take the rounded linear
  interpolation; bool tensors come from the nearer end (t < 0.5 -> ``a``, t > 0.5 -> ``b``,
  t == 0.5 -> ``a``, the first model).

The streaming engine works chunk by chunk: :func:`accumulate` over every chunk pair, then
:func:`coefficients`, then :func:`combine_into` per chunk, so no float32 copy of a whole large
tensor is ever made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Beyond this |cos(theta)| sin(theta) is too small to divide by; mergekit's value.
DOT_THRESHOLD = 0.9995
# Norms at or below this are left unnormalised (mergekit's eps); avoids dividing by ~0.
NORM_EPS = 1e-8
# Elements per chunk: 4 Mi elements = 16 MiB per float32 buffer, small enough to bound memory.
DEFAULT_CHUNK_NUMEL = 1 << 22
# Reductions are summed in float32 over blocks of this many elements and the block sums in
# float64: a whole-tensor float32 sum over ~65M elements has been seen off by 0.6%.
_BLOCK = 4096


@dataclass
class SlerpStats:
    """Running float64 sums over the flattened tensors: a.b, a.a and b.b (raw, unnormalised)."""

    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0

    def is_finite(self) -> bool:
        return math.isfinite(self.dot) and math.isfinite(self.sq_a) and math.isfinite(self.sq_b)


def _blocked_sum(x: torch.Tensor, y: torch.Tensor) -> float:
    """sum(x*y) with float32 partial sums per block, accumulated in float64."""
    n = x.numel()
    full = n - n % _BLOCK
    total = 0.0
    if full:
        xb = x[:full].view(-1, _BLOCK)
        yb = y[:full].view(-1, _BLOCK)
        total += float(torch.linalg.vecdot(xb, yb).sum(dtype=torch.float64))
    if full < n:
        total += float(torch.dot(x[full:].double(), y[full:].double()))
    return total


def accumulate(stats: SlerpStats, a32: torch.Tensor, b32: torch.Tensor) -> None:
    """Add one chunk pair (flat, float32, same device) to the running sums."""
    stats.dot += _blocked_sum(a32, b32)
    stats.sq_a += _blocked_sum(a32, a32)
    stats.sq_b += _blocked_sum(b32, b32)


def coefficients(stats: SlerpStats, t: float) -> tuple[float, float]:
    """The weights (s0, s1) so that the result is s0*a + s1*b on the raw tensors."""
    norm_a = math.sqrt(stats.sq_a)
    norm_b = math.sqrt(stats.sq_b)
    # mergekit normalises a copy only when its norm exceeds eps; a ~zero tensor stays as is.
    scale_a = norm_a if norm_a > NORM_EPS else 1.0
    scale_b = norm_b if norm_b > NORM_EPS else 1.0
    dot = stats.dot / (scale_a * scale_b)
    if abs(dot) > DOT_THRESHOLD:
        # (Anti)parallel: sin(theta) ~ 0, so interpolate linearly (also covers identical tensors).
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def combine_into(
    out: torch.Tensor, a32: torch.Tensor, b32: torch.Tensor, s0: float, s1: float
) -> torch.Tensor:
    """out = s0*a32 + s1*b32, computed in float32 and cast into ``out`` (any float dtype).

    ``a32`` is used as scratch space and overwritten.
    """
    a32.mul_(s0).add_(b32, alpha=s1)
    out.copy_(a32)
    return out


def merge_integer(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Non-float tensors: rounded lerp for integers, nearer end for bools (see module doc)."""
    if a.dtype == torch.bool:
        return (b if t > 0.5 else a).clone()
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    mixed = a.to(torch.float64) * (1.0 - t) + b.to(torch.float64) * t
    return torch.round(mixed).to(a.dtype)


def check_t(t: float) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a float in [0, 1], got {type(t).__name__}")
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise ValueError(f"t must be in [0, 1], got {t}")


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    out_dtype: torch.dtype | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> torch.Tensor:
    """SLERP of two same-shape tensors as whole vectors, chunked so memory stays bounded.

    Args:
        a: the t=0 end.
        b: the t=1 end (same shape; same float-ness as ``a``).
        t: interpolation factor in [0, 1].
        out_dtype: result dtype (default ``a.dtype``).
        chunk_numel: elements per float32 working chunk.

    Returns:
        A new tensor of ``a``'s shape, on ``a``'s device.
    """
    check_t(t)
    # Merging is not differentiable (the weights go through Python floats); detaching also keeps
    # parameters from warning when their sums are read.
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.is_floating_point() != b.is_floating_point():
        raise ValueError(f"cannot merge {a.dtype} with {b.dtype}")
    b = b.to(a.device)  # the result lives on a's device, integer and bool paths included
    if not a.is_floating_point():
        return merge_integer(a, b.to(a.dtype), t)
    out_dtype = out_dtype or a.dtype
    if t == 0:
        return a.to(out_dtype, copy=True)
    if t == 1:
        return b.to(out_dtype, copy=True)
    flat_a = a.reshape(-1)  # copies only when non-contiguous (e.g. channels_last)
    flat_b = b.reshape(-1)
    n = flat_a.numel()
    step = max(1, chunk_numel)
    spans = [(s, min(s + step, n)) for s in range(0, n, step)]
    stats = SlerpStats()
    for s, e in spans:
        accumulate(stats, flat_a[s:e].float(), flat_b[s:e].float())
    s0, s1 = coefficients(stats, t)
    out = torch.empty(n, dtype=out_dtype, device=a.device)
    for s, e in spans:
        a32 = flat_a[s:e].to(torch.float32, copy=True)
        combine_into(out[s:e], a32, flat_b[s:e].float(), s0, s1)
    return out.view(a.shape)
