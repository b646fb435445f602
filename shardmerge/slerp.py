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

The streaming engine works chunk by chunk on the inputs' raw values: :func:`accumulate_chunk` over
every chunk, then :func:`coefficients`, then :func:`combine_chunk` per chunk. Both convert to
float32 a cache-sized piece at a time (:data:`SUB_NUMEL`), so float32 copies never go out to
main memory and no float32 copy of a whole large tensor is ever made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Beyond this |cos(theta)| sin(theta) is too small to divide by; mergekit's value.
DOT_THRESHOLD = 0.9995
# Norms at or below this are left unnormalised (mergekit's eps); avoids dividing by ~0.
NORM_EPS = 1e-8
# Elements per chunk: 4 Mi elements = 16 MiB per float32 buffer, small enough to bound memory.
DEFAULT_CHUNK_NUMEL = 1 << 22
# Work happens on a "pair buffer" of shape (2, rows, BLOCK): half 0 holds ``a`` and half 1 ``b``
# as float32 in blocks of BLOCK elements, the last block zero-padded (zeros add nothing to the
# sums). One batched (2 x BLOCK) @ (BLOCK x 2) product over the blocks gives a.a, a.b and b.b of
# every block in a single pass over memory; block sums are float32 and are added up in float64,
# since a whole-tensor float32 sum over ~65M elements has been seen off by 0.6%. Contiguous
# halves keep the conversion and the combine at memory speed.
BLOCK = 4096
# Elements per piece converted to float32 at a time on the CPU: the piece's float32 pair (4 MiB)
# stays in the CPU's cache between the conversion and the sums or the combine, so main memory
# sees only the raw inputs and the output. Measured on medium: the merge phase went from 1.87-1.95 s
# (whole chunks through a 128 MiB float32 buffer) to 1.63-1.78 s; 64 Ki-element pieces were slower
# (per-op overhead), 512 Ki to 1 Mi about equal. A CUDA device takes whole chunks (fewer kernels).
SUB_NUMEL = 1 << 19


@dataclass
class SlerpStats:
    """Running float64 sums over the flattened tensors: a.b, a.a and b.b (raw, unnormalised)."""

    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0

    def is_finite(self) -> bool:
        return math.isfinite(self.dot) and math.isfinite(self.sq_a) and math.isfinite(self.sq_b)

    def add(self, other: SlerpStats) -> None:
        self.dot += other.dot
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b


def pair_buffer(numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A float32 pair buffer able to hold ``numel`` elements of each input."""
    return torch.empty(2, -(-numel // BLOCK), BLOCK, dtype=torch.float32, device=device)


def load_pair(buf: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Copy flat, contiguous ``a`` and ``b`` (any float dtype) into ``buf`` as float32.

    Returns the blocks used, ``(2, ceil(n / BLOCK), BLOCK)``, the last one zero-padded.
    """
    n = a.numel()
    full, tail = divmod(n, BLOCK)
    rows = full + (1 if tail else 0)
    x = buf[:, :rows]
    if full:
        x[0, :full].copy_(a[: full * BLOCK].view(full, BLOCK))
        x[1, :full].copy_(b[: full * BLOCK].view(full, BLOCK))
    if tail:
        x[:, full, tail:].zero_()
        x[0, full, :tail].copy_(a[full * BLOCK :])
        x[1, full, :tail].copy_(b[full * BLOCK :])
    return x


def accumulate_pair(stats: SlerpStats, x: torch.Tensor) -> None:
    """Add a loaded pair buffer's a.b, a.a and b.b to the running sums."""
    if x.numel() == 0:
        return
    blocks = x.transpose(0, 1)  # (rows, 2, BLOCK): each block's a and b side by side
    gram = torch.bmm(blocks, blocks.transpose(1, 2)).sum(0, dtype=torch.float64).tolist()
    stats.sq_a += gram[0][0]
    stats.dot += gram[0][1]
    stats.sq_b += gram[1][1]


def accumulate(stats: SlerpStats, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add one chunk pair (flat, same device, any float dtype) to the running sums."""
    sub = sub_numel(a.device)
    scratch = pair_buffer(min(sub, a.numel()) if sub else a.numel(), a.device)
    accumulate_chunk(stats, a, b, scratch, sub=sub)


def sub_numel(device: torch.device | str | None) -> int:
    """Elements per float32 piece on ``device`` (see :data:`SUB_NUMEL`); 0 means the whole chunk."""
    return 0 if device is not None and torch.device(device).type == "cuda" else SUB_NUMEL


def _loaded_pieces(
    a: torch.Tensor,
    b: torch.Tensor,
    scratch: torch.Tensor,
    sub: int,
    round_to: torch.dtype | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, float32 pair) for each piece of ``sub`` elements (0: one piece), loaded into
    ``scratch`` one after the other."""
    n = a.numel()
    step = n if sub <= 0 else max(BLOCK, sub - sub % BLOCK)
    for s in range(0, n, max(step, 1)):
        e = min(s + step, n)
        yield s, e, load_pair(scratch, _rounded(a[s:e], round_to), _rounded(b[s:e], round_to))


def _rounded(x: torch.Tensor, round_to: torch.dtype | None) -> torch.Tensor:
    # mergekit's ``dtype``: inputs are rounded to it before the math.
    return x if round_to is None or x.dtype == round_to else x.to(round_to)


def accumulate_chunk(
    stats: SlerpStats,
    a: torch.Tensor,
    b: torch.Tensor,
    scratch: torch.Tensor,
    *,
    sub: int = SUB_NUMEL,
    round_to: torch.dtype | None = None,
) -> None:
    """Add a chunk pair (flat, on ``scratch``'s device, any float dtype) to the running sums,
    converting ``sub`` elements at a time into ``scratch`` (a :func:`pair_buffer` that large;
    ``sub`` 0 = the whole chunk at once)."""
    for _, _, x in _loaded_pieces(a, b, scratch, sub, round_to):
        accumulate_pair(stats, x)


def combine_chunk(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    s0: float,
    s1: float,
    scratch: torch.Tensor,
    *,
    sub: int = SUB_NUMEL,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """out = s0*a + s1*b for a chunk pair, in float32 pieces of ``sub`` elements (see
    :func:`accumulate_chunk`), each cast into ``out`` (flat, same length, any float dtype)."""
    for s, e, x in _loaded_pieces(a, b, scratch, sub, round_to):
        combine_pair(out[s:e], x, s0, s1)
    return out


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


def combine_pair(out: torch.Tensor, x: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """out = s0*a + s1*b from a loaded pair buffer, computed in float32 and cast into ``out``
    (flat, the chunk's element count, any float dtype). ``x`` is overwritten."""
    n = out.numel()
    full, tail = divmod(n, BLOCK)
    mixed = x[0]
    mixed.mul_(s0).add_(x[1], alpha=s1)
    if full:
        out[: full * BLOCK].view(full, BLOCK).copy_(mixed[:full])
    if tail:
        out[full * BLOCK :].copy_(mixed[full, :tail])
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
    step = max(BLOCK, chunk_numel - chunk_numel % BLOCK)
    spans = [(s, min(s + step, n)) for s in range(0, n, step)]
    # The engine's partition and order: each chunk's sums over its pieces of ``sub`` elements,
    # then the chunks' sums in order, so its sums are bit for bit these.
    sub = sub_numel(a.device)
    scratch = pair_buffer(min(sub or step, step, max(n, 1)), a.device)
    stats = SlerpStats()
    for s, e in spans:
        part = SlerpStats()
        accumulate_chunk(part, flat_a[s:e], flat_b[s:e], scratch, sub=sub)
        stats.add(part)
    s0, s1 = coefficients(stats, t)
    out = torch.empty(n, dtype=out_dtype, device=a.device)
    for s, e in spans:
        combine_chunk(out[s:e], flat_a[s:e], flat_b[s:e], s0, s1, scratch, sub=sub)
    return out.view(a.shape)
