"""Check that two merged checkpoints agree tensor by tensor, within one bf16 step.

Two values x, y agree when |x - y| <= ulp_bf16(max(|x|, |y|)), the gap between adjacent bf16
numbers at that magnitude, or, where the two models nearly cancel and the result is tiny next to
the weights, when |x - y| <= 2**-16 * rms of that block of the tensor: float32 rounding noise of
the two interpolation terms (1/256 of a bf16 step at the weights' scale), which the step of a
near-zero result cannot absorb. Tensors are read in row blocks through safe_open, so memory stays
bounded whatever the model size.

    python benchmarks/compare.py OUT_DIR_1 OUT_DIR_2 [--json report.json]

Exit status: 0 when names, shapes and dtypes match and every value is within 1 bf16 step,
1 when they do not, 2 for unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

# Elements compared at a time (float32 scratch of a few times 64 MiB).
BLOCK_NUMEL = 1 << 24
# bf16 keeps 8 significant bits: ulp(m) = 2**(floor(log2 m) - 7) for normal m.
BF16_MANTISSA_BITS = 7
# Cancellation allowance, relative to the block's RMS (see the module docstring).
CANCELLATION_NOISE = 2.0**-16
# Smallest bf16 subnormal; the ulp of every value below the normal range.
BF16_MIN_ULP = 2.0**-133


@dataclass
class TensorDiff:
    name: str
    max_abs: float
    max_ulps: float
    elements_over_1ulp: int
    elements_differing: int
    # Largest max(|x|, |y|) among the elements over one step: tiny when only near-zero
    # results (cancellation between the two models) are over.
    max_magnitude_over_1ulp: float = 0.0


@dataclass
class Comparison:
    """What compare_checkpoints found; ok is True when everything is within 1 bf16 step."""

    tensors: int = 0
    tensors_differing: int = 0
    tensors_over_1ulp: int = 0
    elements: int = 0
    elements_differing: int = 0
    elements_over_1ulp: int = 0
    max_abs: float = 0.0
    max_ulps: float = 0.0
    max_magnitude_over_1ulp: float = 0.0
    problems: list[str] = field(default_factory=list)
    worst: list[TensorDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.elements_over_1ulp == 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"ok": self.ok}


def shard_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to its safetensors file (an index, or every *.safetensors file)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors.index.json or *.safetensors")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names |= dict.fromkeys(f.keys(), file)
    return names


def ulp_bf16(magnitude: torch.Tensor) -> torch.Tensor:
    """The bf16 step at each (non-negative, float32) magnitude."""
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(magnitude), exponent - 1 - BF16_MANTISSA_BITS)
    ulp[magnitude == 0] = BF16_MIN_ULP  # frexp(0) has exponent 0, not the bottom of the range
    return ulp.clamp_min_(BF16_MIN_ULP)


def _compare_tensor(name: str, slice_x, slice_y, shape: list[int]) -> TensorDiff:
    rows = shape[0] if shape else 1
    row_numel = 1
    for d in shape[1:]:
        row_numel *= d
    block_rows = max(1, BLOCK_NUMEL // max(1, row_numel))
    diff = TensorDiff(name, 0.0, 0.0, 0, 0)
    for start in range(0, rows, block_rows):
        stop = min(rows, start + block_rows)
        if shape:
            x, y = slice_x[start:stop], slice_y[start:stop]
        else:  # 0-dim tensors cannot be sliced
            x, y = slice_x[:], slice_y[:]
        diff.elements_differing += int(torch.count_nonzero(x != y))
        x, y = x.float(), y.float()
        abs_diff = (x - y).abs_()
        magnitude = torch.maximum(x.abs_(), y.abs_())
        ulps = abs_diff / ulp_bf16(magnitude)
        noise = CANCELLATION_NOISE * float(magnitude.square().mean().sqrt()) if x.numel() else 0.0
        over = (ulps > 1) & (abs_diff > noise)
        diff.elements_over_1ulp += int(torch.count_nonzero(over))
        if over.any():
            worst_magnitude = float(magnitude[over].max())
            diff.max_magnitude_over_1ulp = max(diff.max_magnitude_over_1ulp, worst_magnitude)
        if abs_diff.numel():
            diff.max_abs = max(diff.max_abs, float(abs_diff.max()))
            diff.max_ulps = max(diff.max_ulps, float(ulps.max()))
    return diff


def compare_checkpoints(dir_x: Path, dir_y: Path, *, keep_worst: int = 5) -> Comparison:
    """Compare every tensor of two checkpoints, one block of rows at a time."""
    files_x, files_y = shard_files(dir_x), shard_files(dir_y)
    result = Comparison()
    for name in sorted(files_x.keys() - files_y.keys()):
        result.problems.append(f"{name}: only in {dir_x}")
    for name in sorted(files_y.keys() - files_x.keys()):
        result.problems.append(f"{name}: only in {dir_y}")
    diffs = []
    for name in sorted(files_x.keys() & files_y.keys()):
        with safe_open(files_x[name], framework="pt") as fx, safe_open(files_y[name], "pt") as fy:
            sx, sy = fx.get_slice(name), fy.get_slice(name)
            shape_x, shape_y = sx.get_shape(), sy.get_shape()
            dtype_x, dtype_y = sx.get_dtype(), sy.get_dtype()
            if shape_x != shape_y or dtype_x != dtype_y:
                result.problems.append(
                    f"{name}: {dtype_x}{shape_x} in {dir_x}, {dtype_y}{shape_y} in {dir_y}"
                )
                continue
            diff = _compare_tensor(name, sx, sy, shape_x)
        numel = 1
        for d in shape_x:
            numel *= d
        result.tensors += 1
        result.elements += numel
        result.elements_differing += diff.elements_differing
        result.elements_over_1ulp += diff.elements_over_1ulp
        result.tensors_differing += diff.elements_differing > 0
        result.tensors_over_1ulp += diff.elements_over_1ulp > 0
        result.max_abs = max(result.max_abs, diff.max_abs)
        result.max_ulps = max(result.max_ulps, diff.max_ulps)
        result.max_magnitude_over_1ulp = max(
            result.max_magnitude_over_1ulp, diff.max_magnitude_over_1ulp
        )
        diffs.append(diff)
    result.worst = sorted(diffs, key=lambda d: d.max_ulps, reverse=True)[:keep_worst]
    result.worst = [d for d in result.worst if d.elements_differing]
    return result


def format_comparison(c: Comparison, label_x: str, label_y: str) -> str:
    """A few lines for a person: the verdict first, then the worst tensors."""
    verdict = "AGREE (all within 1 bf16 step)" if c.ok else "DISAGREE"
    lines = [
        f"{label_x} vs {label_y}: {verdict}",
        f"  tensors: {c.tensors} compared, {c.tensors_differing} differ at all, "
        f"{c.tensors_over_1ulp} by more than 1 bf16 step",
        f"  elements: {c.elements_differing} of {c.elements} differ, "
        f"{c.elements_over_1ulp} by more than 1 bf16 step",
        f"  max |x-y| = {c.max_abs:.3g}, max |x-y| / ulp_bf16 = {c.max_ulps:.3g}",
    ]
    if c.elements_over_1ulp:
        lines.append(
            f"  every element over 1 bf16 step has max(|x|, |y|) <= {c.max_magnitude_over_1ulp:.3g}"
        )
    lines += [f"  problem: {p}" for p in c.problems[:20]]
    if len(c.problems) > 20:
        lines.append(f"  ... and {len(c.problems) - 20} more problems")
    for d in c.worst:
        lines.append(
            f"  worst: {d.name}: {d.elements_differing} differ, max {d.max_ulps:.3g} ulp "
            f"({d.max_abs:.3g})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir_x", type=Path)
    parser.add_argument("dir_y", type=Path)
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    try:
        comparison = compare_checkpoints(args.dir_x, args.dir_y)
    except (OSError, ValueError, KeyError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(format_comparison(comparison, str(args.dir_x), str(args.dir_y)))
    if args.json:
        args.json.write_text(json.dumps(comparison.to_dict(), indent=2))
    return 0 if comparison.ok else 1


if __name__ == "__main__":
    sys.exit(main())
