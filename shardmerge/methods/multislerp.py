"""``multislerp``: barycentric SLERP of any number of models (or of their task vectors from a
base, added back to it), mergekit 0.1.5's ``multislerp``.

With vectors ``v_i`` (the models, or ``x_i - base``), weights ``w_i`` (divided by their sum with
``normalize_weights``, the default) and unit vectors ``u_i = v_i / (|v_i| + eps)``: the mean
direction ``m = sum w_i u_i / |sum w_i u_i|``; the weighted tangent vectors at it,
``t = sum w_i (u_i - (u_i . m) m)``; the exponential map ``m cos|t| + t sin|t| / |t|`` (``|t|``
plus ``eps``), scaled by ``sum w_i |v_i|``. A single model is returned as it is. Where the
weighted sum of unit vectors vanishes (``< eps``), two models take the lerp ``w_1 v_1 + w_2
v_2``, more are an error (mergekit's rules).

Every vector in that recipe is a combination of the ``v_i`` and every norm and dot product a
quadratic form over their Gram matrix, so, as for ``karcher``, one statistics pass (the Gram
matrix, float64) gives coefficients ``a_i`` and the combine writes ``sum a_i v_i`` (float32
accumulation). mergekit computes it in the merge dtype (its bf16 tangent vector is rounding
noise that the exponential map adds back); ours is float64 until the one final rounding, so
with ``dtype: float32`` the two agree within a bf16 step, in bf16 ours is nearer the exact value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch


class MultiSlerpMerge:
    def __init__(self, job: TensorJob) -> None:
        from shardmerge.methods.sums import BlockSums
        from shardmerge.methods.task_vectors import L1_BLOCK

        self.name = job.name
        self.weights = [float(p["weight"]) for p in job.model_params]
        self.count = len(self.weights)
        self.normalize = bool(job.shared["normalize_weights"])
        self.eps = float(job.shared["eps"])
        self.block = L1_BLOCK  # the engine's chunks are whole blocks
        self.sums = BlockSums(self.count * self.count)
        self.passes = 1 if self.count > 1 and job.numel else 0
        self.coefficients: list[float] = [0.0] * self.count

    def _vectors(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) > self.count:  # with a base: task vectors in the merge dtype, as mergekit
            return [x - inputs[0] for x in inputs[1:]]
        return list(inputs)

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        from shardmerge.methods.sums import block_gram

        self.sums.add(block_gram(self._vectors(inputs), self.block), start // self.block)

    def in_any_order(self, pass_index: int) -> bool:
        """Any order: the Gram pass's block sums name their first block (BlockSums folds them
        in flat order), and the combine's chunks are independent."""
        return True

    def end_pass(self, pass_index: int) -> None:
        totals = self.sums.totals()
        k = self.count
        gram = [totals[i * k : (i + 1) * k] for i in range(k)]
        self.coefficients = multislerp_coefficients(
            gram, self.weights, self.normalize, self.eps, self.name
        )

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        if self.count == 1:  # mergekit returns the one model itself (base or not)
            return inputs[-1]
        from shardmerge.methods.karcher import weighted_sum

        merged = weighted_sum(self._vectors(inputs), self.coefficients)
        return inputs[0] + merged if len(inputs) > self.count else merged


def multislerp_coefficients(
    gram: Sequence[Sequence[float]],
    weights: Sequence[float],
    normalize: bool,
    eps: float,
    name: str,
) -> list[float]:
    """``a`` such that the result is ``sum_i a_i v_i``, from the Gram matrix of the ``v_i``.

    Raises:
        ValueError: the weighted unit vectors cancel out and there are more than two models.
    """
    k = len(gram)
    w = list(weights)
    if normalize:
        total = sum(w)
        w = [x / total for x in w]
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
    zero = [i + 1 for i in range(k) if norms[i] + eps == 0]
    if zero:
        raise ValueError(
            f"tensor {name!r}: model {zero[0]}'s vector (its task vector, with a base) is zero "
            "and eps is 0, so its unit vector is 0/0 (mergekit writes NaNs there); set eps above 0"
        )
    # Gram matrix of the unit vectors u_i = v_i / (|v_i| + eps).
    u = [[gram[i][j] / ((norms[i] + eps) * (norms[j] + eps)) for j in range(k)] for i in range(k)]

    def dot(p: Sequence[float], q: Sequence[float]) -> float:
        return sum(p[a] * u[a][b] * q[b] for a in range(k) for b in range(k))

    mean_norm = math.sqrt(max(dot(w, w), 0.0))
    if mean_norm < eps:
        if k == 2:  # mergekit's fallback: the lerp of the raw vectors
            return list(w)
        raise ValueError(
            f"tensor {name!r}: multislerp's weighted sum of the unit vectors is zero (antipodal "
            "models with weights that balance out); change a weight"
        )
    mean = [x / mean_norm for x in w]
    dots = [sum(u[i][b] * mean[b] for b in range(k)) for i in range(k)]
    along = sum(wi * di for wi, di in zip(w, dots, strict=True))
    tangent = [wi - along * mi for wi, mi in zip(w, mean, strict=True)]
    step = math.sqrt(max(dot(tangent, tangent), 0.0)) + eps
    direction = [
        mi * math.cos(step) + ti * math.sin(step) / step
        for mi, ti in zip(mean, tangent, strict=True)
    ]
    scale = sum(n * wi for n, wi in zip(norms, w, strict=True))
    return [scale * d / (n + eps) for d, n in zip(direction, norms, strict=True)]


METHOD = MethodSpec(
    name="multislerp",
    base="optional",
    params=(
        Param("weight", per_model=True, default=None),
        Param("normalize_weights", per_model=False, default=True, kind="bool"),
        Param("eps", per_model=False, default=1e-8, low=0),
    ),
    start=MultiSlerpMerge,
    summary="barycentric SLERP of any number of models (or of their task vectors from a base)",
)
