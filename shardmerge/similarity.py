"""How two models (and their task vectors from a base) differ, tensor by tensor: pure statistics.

No files: :func:`accumulate` adds one chunk of flat tensors to a tensor's running :class:`Sums`,
and :func:`summarize` groups finished sums by layer and module type into a :class:`Comparison`.
Every statistic is a ratio of sums that add up over chunks and over tensors, so a group's
numbers are those of its tensors taken as one concatenated vector: a tensor counts by its squared
norm (RMSNorm weights, all near 1, can outweigh a layer's matrices in a small model).

* cosine: a.b / (|a| |b|);
* relative L2 distance: |a - b| / |a| (relative to the first model);
* with a base: the cosine between the task vectors a - base and b - base, and their sign
  agreement: the fraction of elements, among those where both task vectors are non-zero, where
  they have the same sign (the conflicts TIES resolves).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields

import torch

from shardmerge.schedule import MODULE_TYPES, find_layer, module_type

# Elements of a piece converted to float32 at a time on the CPU: 3 inputs x 512 Ki x 4 bytes stay
# in the CPU's cache between the conversion and the sums (as slerp.SUB_NUMEL).
SUB_NUMEL = 1 << 19
# Sums run over blocks of this many elements in float32 and the block sums add up in float64: a
# whole-tensor float32 sum has been seen off by 0.6% (see slerp.BLOCK).
BLOCK = 4096


@dataclass
class Sums:
    """Running float64 sums of one tensor (or group); ``task_*`` and ``sign_*`` need a base."""

    numel: int = 0
    dot: float = 0.0  # a.b
    sq_a: float = 0.0
    sq_b: float = 0.0
    sq_diff: float = 0.0  # |a - b|^2, summed directly: sq_a + sq_b - 2 a.b cancels when a ~ b
    task_dot: float = 0.0  # (a - base).(b - base)
    task_sq_a: float = 0.0
    task_sq_b: float = 0.0
    sign_agree: int = 0  # elements where both task vectors are non-zero and share their sign
    sign_total: int = 0  # elements where both task vectors are non-zero

    def add(self, other: Sums) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def non_finite(self) -> str | None:
        """Which input holds NaN or Inf ("a", "b" or "base"), or None when all are finite."""
        for key, value in (("a", self.sq_a), ("b", self.sq_b)):
            if not math.isfinite(value):
                return key
        if not (math.isfinite(self.task_sq_a) and math.isfinite(self.task_sq_b)):
            return "base"
        return None

    @property
    def cosine(self) -> float | None:
        return _cosine(self.dot, self.sq_a, self.sq_b)

    @property
    def rel_l2(self) -> float | None:
        return math.sqrt(self.sq_diff / self.sq_a) if self.sq_a > 0 else None

    @property
    def task_cosine(self) -> float | None:
        return _cosine(self.task_dot, self.task_sq_a, self.task_sq_b)

    @property
    def sign_agreement(self) -> float | None:
        return self.sign_agree / self.sign_total if self.sign_total else None

    def metrics(self, with_base: bool) -> dict[str, float | None]:
        out = {"cosine": self.cosine, "rel_l2": self.rel_l2}
        if with_base:
            out |= {"task_cosine": self.task_cosine, "sign_agreement": self.sign_agreement}
        return out


def _cosine(dot: float, sq_x: float, sq_y: float) -> float | None:
    # Undefined for a zero vector (a tensor of zeros, or a task vector that did not move).
    if sq_x <= 0 or sq_y <= 0:
        return None
    return max(-1.0, min(1.0, dot / math.sqrt(sq_x * sq_y)))


def scratch_buffer(numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 room for ``numel`` elements in 5 rows: a, b, a - b, a - base, b - base."""
    return torch.empty(5, -(-numel // BLOCK), BLOCK, dtype=torch.float32, device=device)


def sub_numel(device: torch.device | str | None) -> int:
    """Elements per float32 piece on ``device``; 0: the whole chunk at once (CUDA)."""
    return 0 if device is not None and torch.device(device).type == "cuda" else SUB_NUMEL


def accumulate(
    sums: Sums,
    a: torch.Tensor,
    b: torch.Tensor,
    base: torch.Tensor | None,
    scratch: torch.Tensor,
    *,
    sub: int = SUB_NUMEL,
) -> None:
    """Add a chunk (flat tensors of one length, any float dtype, on ``scratch``'s device).

    ``scratch`` is a :func:`scratch_buffer` for ``sub`` elements (0: for the whole chunk).
    """
    n = a.numel()
    step = n if sub <= 0 else max(BLOCK, sub - sub % BLOCK)
    for s in range(0, n, max(step, 1)):
        e = min(s + step, n)
        if base is None:
            x = _load(scratch, [(0, a[s:e]), (1, b[s:e])], rows=3)
        else:
            x = _load(scratch, [(0, a[s:e]), (1, b[s:e]), (4, base[s:e])], rows=5)
        _accumulate_piece(sums, x)
    sums.numel += n


def _load(scratch: torch.Tensor, parts: list[tuple[int, torch.Tensor]], rows: int) -> torch.Tensor:
    """Copy each (row, part) into ``scratch`` as float32 blocks, the last block zero-padded
    (zeros add nothing to any sum and are neither sign); returns the first ``rows`` rows."""
    n = parts[0][1].numel()
    full, tail = divmod(n, BLOCK)
    blocks = full + (1 if tail else 0)
    x = scratch[:rows, :blocks]
    if tail:
        x[:, full].zero_()
    for row, part in parts:
        if full:
            x[row, :full].copy_(part[: full * BLOCK].view(full, BLOCK))
        if tail:
            x[row, full, :tail].copy_(part[full * BLOCK :])
    return x


# Row pairs whose dot products are summed: (a, a), (a, b), (b, b), (a - b, a - b), then with a
# base (a - base, a - base), (a - base, b - base), (b - base, b - base).
_PAIRS = ((0, 0), (0, 1), (1, 1), (2, 2), (3, 3), (3, 4), (4, 4))


def _accumulate_piece(sums: Sums, x: torch.Tensor) -> None:
    """Rows of ``x``: a, b, then a - b; with a base (in row 4) also a - base and b - base.
    Each pair's dot product per block (float32, ``vecdot``: one pass over two cached rows, 2-3x
    faster here than one batched Gram product of all rows), the blocks added up in float64."""
    torch.sub(x[0], x[1], out=x[2])
    with_base = x.shape[0] == 5
    if with_base:
        torch.sub(x[0], x[4], out=x[3])
        torch.sub(x[1], x[4], out=x[4])  # b - base in place (elementwise: aliasing is safe)
    pairs = _PAIRS if with_base else _PAIRS[:4]
    dots = torch.empty(len(pairs) + 2, x.shape[1], dtype=x.dtype, device=x.device)
    for k, (i, j) in enumerate(pairs):
        torch.linalg.vecdot(x[i], x[j], out=dots[k])
    if with_base:
        # sign((a - base) * (b - base)) is +1 where the task vectors agree, -1 where they
        # conflict, 0 where either is zero: its sum and its count of non-zeros per block are
        # small integers, exact in float32.
        signs = torch.mul(x[3], x[4], out=x[2]).sign_()
        torch.sum(signs, dim=1, out=dots[-2])
        torch.linalg.vecdot(signs, signs, out=dots[-1])
    totals = dots.sum(1, dtype=torch.float64).tolist()
    sums.sq_a += totals[0]
    sums.dot += totals[1]
    sums.sq_b += totals[2]
    sums.sq_diff += totals[3]
    if with_base:
        sums.task_sq_a += totals[4]
        sums.task_dot += totals[5]
        sums.task_sq_b += totals[6]
        net, nonzero = round(totals[7]), round(totals[8])
        sums.sign_agree += (nonzero + net) // 2
        sums.sign_total += nonzero


# --------------------------------------------------------------------------- grouping


@dataclass(frozen=True)
class TensorResult:
    name: str
    layer: int | None  # index in its stack; None outside every stack
    stack: str | None
    module_type: str
    sums: Sums


@dataclass(frozen=True)
class LayerResult:
    """One layer of a stack: all its tensors together, and per module type."""

    stack: str
    index: int
    total: Sums
    by_type: dict[str, Sums]


@dataclass(frozen=True)
class Comparison:
    """Everything ``compare`` reports; ``labels`` name the inputs ("a", "b" and maybe "base")."""

    labels: dict[str, str]
    with_base: bool
    tensors: tuple[TensorResult, ...]
    layers: tuple[LayerResult, ...]
    by_type: dict[str, Sums]  # over the whole model
    total: Sums
    skipped: tuple[str, ...] = field(default=())  # integer tensors: no statistics

    @property
    def module_types(self) -> tuple[str, ...]:
        """The module types present, in MODULE_TYPES order."""
        return tuple(t for t in MODULE_TYPES if t in self.by_type)

    @property
    def layer_labels(self) -> list[str]:
        stacks = {layer.stack for layer in self.layers}
        if len(stacks) <= 1:
            return [str(layer.index) for layer in self.layers]
        return [f"{layer.stack}.{layer.index}" for layer in self.layers]


def summarize(
    results: Iterable[tuple[str, Sums]],
    labels: dict[str, str],
    *,
    with_base: bool,
    skipped: Iterable[str] = (),
) -> Comparison:
    """Group per-tensor sums by layer and module type."""
    tensors = []
    layers: dict[tuple[str, int], LayerResult] = {}
    by_type: dict[str, Sums] = {}
    total = Sums()
    for name, sums in results:
        kind = module_type(name)
        where = find_layer(name)
        stack, index = where if where is not None else (None, None)
        tensors.append(TensorResult(name, index, stack, kind, sums))
        total.add(sums)
        by_type.setdefault(kind, Sums()).add(sums)
        if stack is not None and index is not None:
            layer = layers.setdefault((stack, index), LayerResult(stack, index, Sums(), {}))
            layer.total.add(sums)
            layer.by_type.setdefault(kind, Sums()).add(sums)
    ordered = tuple(layers[key] for key in sorted(layers))
    by_type = {k: by_type[k] for k in MODULE_TYPES if k in by_type}
    return Comparison(labels, with_base, tuple(tensors), ordered, by_type, total, tuple(skipped))


def to_json(comparison: Comparison) -> dict[str, object]:
    """A JSON-ready dict: inputs, totals, per module type, per layer, per tensor."""
    base = comparison.with_base

    def numbers(sums: Sums) -> dict[str, object]:
        return {"numel": sums.numel, **sums.metrics(base)}

    return {
        "models": comparison.labels,
        "overall": numbers(comparison.total),
        "module_types": {k: numbers(v) for k, v in comparison.by_type.items()},
        "layers": [
            {
                "stack": layer.stack,
                "layer": layer.index,
                "all": numbers(layer.total),
                **{k: numbers(v) for k, v in layer.by_type.items()},
            }
            for layer in comparison.layers
        ],
        "tensors": [
            {
                "name": t.name,
                "layer": t.layer,
                "module_type": t.module_type,
                **numbers(t.sums),
            }
            for t in comparison.tensors
        ],
        "skipped_non_float": list(comparison.skipped),
    }


def render_table(comparison: Comparison) -> str:
    """The text report: per layer (cosine per module type, then the layer as a whole), the
    tensors outside the layers one by one, and the totals per module type."""
    base = comparison.with_base
    kinds = [k for k in comparison.module_types if any(k in ly.by_type for ly in comparison.layers)]
    head = ["layer"] + [f"cos {k}" for k in kinds] + ["cos all", "rel L2"]
    if base:
        head += ["task cos", "sign agree"]
    rows = []
    for label, layer in zip(comparison.layer_labels, comparison.layers, strict=True):
        sums = [layer.by_type.get(k) for k in kinds]
        rows.append(
            [label] + [_fmt(s.cosine if s else None) for s in sums] + _row_tail(layer.total, base)
        )
    lines = [f"A: {comparison.labels['a']}", f"B: {comparison.labels['b']}"]
    if base:
        lines.append(f"base: {comparison.labels['base']}")
    lines += ["", *_grid(head, rows)] if rows else []
    outside = [t for t in comparison.tensors if t.layer is None]
    if outside:
        head2 = ["tensor", "type", "cosine", "rel L2"] + (
            ["task cos", "sign agree"] if base else []
        )
        rows2 = [[t.name, t.module_type] + _row_tail(t.sums, base) for t in outside]
        lines += ["", *_grid(head2, rows2)]
    head3 = ["module type", "elements", "cosine", "rel L2"]
    head3 += ["task cos", "sign agree"] if base else []
    rows3 = [[k, f"{s.numel:,}"] + _row_tail(s, base) for k, s in comparison.by_type.items()]
    rows3.append(["all", f"{comparison.total.numel:,}"] + _row_tail(comparison.total, base))
    lines += ["", *_grid(head3, rows3)]
    if comparison.skipped:
        lines.append(f"({len(comparison.skipped)} integer tensors have no statistics)")
    return "\n".join(lines)


def _row_tail(sums: Sums, base: bool) -> list[str]:
    cells = [_fmt(sums.cosine), _fmt(sums.rel_l2)]
    if base:
        cells += [_fmt(sums.task_cosine), _fmt(sums.sign_agreement, ".3f")]
    return cells


def _fmt(value: float | None, spec: str = ".5f") -> str:
    return "-" if value is None else format(value, spec)


def _grid(head: list[str], rows: list[list[str]]) -> Iterator[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        yield "  ".join([first, *rest]).rstrip()
