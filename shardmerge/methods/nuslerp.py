"""``nuslerp``: SLERP of two models with per-model weights, over the whole tensor, per row or
per column; with a base model, SLERP of the two task vectors, added to the base.

``t = w_2 / (w_1 + w_2)`` (0.5 when the weights sum to within 1e-6 of 0). The vectors are the
whole tensor (``nuslerp_flatten``, the default), else each row (the last dimension), or with
``nuslerp_row_wise`` each column (the first dimension: mergekit's code transposes dim 0 to the
end; its docs say the flag selects rows, the code selects columns, and we follow the code). Each
vector: unit vectors ``u = v / max(|v|, 1e-7)``, ``cos = u_1 . u_2`` clamped to [-1, 1]; where
``1 - cos^2 <= 1e-16`` (parallel or antipodal) the lerp ``(1 - t) v_1 + t v_2``, else
``(sin((1 - t) theta) v_1 + sin(t theta) v_2) / sin(theta)`` on the raw vectors.

mergekit 0.1.5 computes all of it in the merge dtype (no upcast: use ``dtype: float32`` for
precise angles); so do we, op for op, with the whole-vector sums (norms, then the dot of the
unit vectors) taken in float64 in two statistics passes. Rows need no pass: a chunk holds
whole rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch

    from shardmerge.methods.sums import BlockSums

NORM_MIN = 1e-7  # mergekit: norms are clamped to this, so a zero vector stays zero
COLINEAR_EPS = 1e-8  # mergekit: 1 - cos^2 <= eps^2 takes the lerp (sin(theta) ~ 0)
WEIGHT_SUM_MIN = 1e-6  # mergekit: weights summing to less than this give t = 0.5


def interpolation_t(weights: Sequence[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < WEIGHT_SUM_MIN else weights[1] / total


class NuSlerpMerge:
    def __init__(self, job: TensorJob) -> None:
        import torch

        self.dtype = job.dtype
        self.device = torch.device(job.device)
        self.t = interpolation_t([float(p["weight"]) for p in job.model_params])
        self.row = job.row_len or max(1, job.numel)
        shape = job.shape or (job.numel,)
        self.mode: Literal["whole", "rows", "columns"]
        if bool(job.shared["nuslerp_flatten"]):
            self.mode = "whole"
        elif bool(job.shared["nuslerp_row_wise"]) and len(shape) >= 2:
            self.mode = "columns"
        else:
            self.mode = "rows"  # a 1-D tensor is one row, the whole tensor
        # Column mode: element j belongs to column j % stride (the product of the other dims).
        self.stride = job.numel // shape[0] if self.mode == "columns" and shape[0] else 1
        self.passes = 2 if self.mode != "rows" and job.numel else 0
        self.count = 1 if self.mode == "whole" else self.stride
        self._sums = torch.zeros(2, self.count, dtype=torch.float64, device=self.device)
        self._whole: BlockSums | None = None  # whole-tensor sums of the current pass
        self.norms: tuple[torch.Tensor, torch.Tensor] | None = None
        self.coefficients: _Coefficients | None = None

    def _vectors(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(inputs) == 3:  # with a base: the task vectors (in the merge dtype, as mergekit)
            return inputs[1] - inputs[0], inputs[2] - inputs[0]
        return inputs[0], inputs[1]

    def _index(self, start: int, n: int) -> torch.Tensor:
        import torch

        return torch.arange(start, start + n, device=self.device) % self.stride

    def _per_element(self, values: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Per-vector values, laid out against a chunk's elements (broadcastable)."""
        return values if self.mode == "whole" else values[self._index(start, n)]

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        from shardmerge.methods.sums import pieces

        for s, e in pieces(inputs[0].numel(), self.row):
            self._reduce_piece(pass_index, [x[s:e] for x in inputs], start + s)

    def _reduce_piece(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        import torch

        v0, v1 = self._vectors(inputs)
        parts: tuple[torch.Tensor, ...]
        if pass_index == 0:
            parts = (v0.to(torch.float64).square(), v1.to(torch.float64).square())
        else:
            assert self.norms is not None
            n0 = self._per_element(self.norms[0], start, v0.numel())
            n1 = self._per_element(self.norms[1], start, v0.numel())
            # mergekit rounds the unit vectors and their product to the merge dtype.
            parts = (((v0 / n0) * (v1 / n1)).to(torch.float64),)
        if self.mode == "whole":  # per-row float64 sums, totalled in flat order
            if self._whole is None:
                from shardmerge.methods.sums import BlockSums

                self._whole = BlockSums(len(parts))
            self._whole.add(torch.stack([p.view(-1, self.row).sum(1) for p in parts], 1))
            return
        index = self._index(start, v0.numel())
        for k, part in enumerate(parts):
            self._sums[k].index_add_(0, index, part)  # in flat order: chunking does not matter

    def _totals(self, width: int) -> torch.Tensor:
        import torch

        if self.mode == "whole":
            assert self._whole is not None
            sums = [[x] for x in self._whole.totals()]
            self._whole = None
            return torch.tensor(sums, dtype=torch.float64, device=self.device)
        totals = self._sums[:width].clone()
        self._sums.zero_()
        return totals

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            sq = self._totals(2)
            n0, n1 = (s.sqrt().to(self.dtype).clamp(min=NORM_MIN) for s in sq)
            self.norms = (n0, n1)
            return
        cos = self._totals(1)[0].to(self.dtype).clamp(-1, 1)
        self.coefficients = _Coefficients(cos, self.t)

    def in_any_order(self, pass_index: int) -> bool:
        """The combine's chunks are independent; the norm and cosine passes add their sums in
        flat order, so their chunks go in turn."""
        return pass_index == self.passes

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        v0, v1 = self._vectors(inputs)
        if self.mode == "rows":
            shape = v0.shape
            rows0, rows1 = v0.view(-1, self.row), v1.view(-1, self.row)
            result = nuslerp_rows(self.t, rows0, rows1).reshape(shape)
        elif self.coefficients is None:  # an empty tensor
            result = v0
        else:
            c = self.coefficients
            n = v0.numel()
            result = c.apply(
                v0,
                v1,
                self._per_element(c.s0, start, n),
                self._per_element(c.s1, start, n),
                self._per_element(c.sin_theta, start, n),
                self._per_element(c.colinear, start, n),
            )
        return inputs[0] + result if len(inputs) == 3 else result


class _Coefficients:
    """Per-vector SLERP coefficients from ``cos`` (merge dtype), as mergekit computes them."""

    def __init__(self, cos: torch.Tensor, t: float) -> None:
        import torch

        self.t = t
        self.colinear = (1 - cos.square()) <= COLINEAR_EPS**2
        theta = torch.acos(torch.where(self.colinear, 0, cos))
        self.sin_theta = torch.sin(theta)
        self.s0 = torch.sin((1 - t) * theta)
        self.s1 = torch.sin(t * theta)

    def apply(
        self,
        v0: torch.Tensor,
        v1: torch.Tensor,
        s0: torch.Tensor,
        s1: torch.Tensor,
        sin_theta: torch.Tensor,
        colinear: torch.Tensor,
    ) -> torch.Tensor:
        import torch

        spherical = (s0 * v0 + s1 * v1) / sin_theta
        return torch.where(colinear, (1 - self.t) * v0 + self.t * v1, spherical)


def nuslerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """NuSLERP of each row of ``v0`` and ``v1`` (2-D, merge dtype), mergekit's ops."""
    import torch

    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_MIN)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_MIN)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    c = _Coefficients(cos, t)
    return c.apply(v0, v1, c.s0, c.s1, c.sin_theta, c.colinear)


METHOD = MethodSpec(
    name="nuslerp",
    base="optional",
    params=(
        Param("weight", per_model=True, default=None),
        Param("nuslerp_flatten", per_model=False, default=True, kind="bool"),
        Param("nuslerp_row_wise", per_model=False, default=False, kind="bool"),
    ),
    start=NuSlerpMerge,
    summary="SLERP of two models (or of their task vectors from a base) with per-model weights",
    row_aligned=True,
    min_models=2,
    max_models=2,
)
