"""``karcher``: the Karcher (Riemannian) mean of the models' directions on the unit sphere,
scaled by their mean norm; every model weighs 1/N (mergekit's ``karcher``; no base: a
``base_model`` is merged as one more model, as mergekit does).

mergekit iterates on whole tensors: start from the normalised average of the unit vectors
``u_i = x_i / |x_i|`` (models with ``|x_i| <= tol`` left out; the first unit vector if that
average is shorter than ``tol``), then up to ``max_iter`` times: the tangent vector
``sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m)`` over the models farther than ``tol``
radians from the mean ``m``; stop when it is shorter than ``tol``, else move ``m`` along it (the
exponential map) and renormalise. The result is ``(sum_i |x_i| / N) m``.

Every vector in that iteration stays a combination ``m = sum_i c_i u_i`` of the unit vectors,
and every dot product and norm it takes is a quadratic form in ``c`` over the Gram matrix
``G_ij = x_i . x_j``. So one statistics pass (G, float64 sums of fixed blocks added exactly,
independent of chunking) is all the tensor needs; the iteration runs on the K x K matrix in
float64, and the combine writes ``sum_i a_i x_i`` (float32 accumulation) rounded once. A large
tensor is read twice (the pass, then the combine), whatever ``max_iter`` is; small ones once.
mergekit rounds the unit vectors and the mean to the merge dtype at every step, and takes the
dot products in it (bf16 angles are coarse); ours are float64 throughout, so results can differ
from mergekit's by its own rounding (the tests bound it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch


class KarcherMerge:
    def __init__(self, job: TensorJob) -> None:
        from shardmerge.methods.sums import BlockSums
        from shardmerge.methods.task_vectors import L1_BLOCK

        self.count = len(job.model_params)
        self.max_iter = int(job.shared["max_iter"])
        self.tol = float(job.shared["tol"])
        self.block = L1_BLOCK  # the engine's chunks are whole blocks
        self.sums = BlockSums(self.count * self.count)
        self.passes = 1 if self.count > 1 and job.numel else 0
        self.coefficients: list[float] = [1.0] * self.count

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        from shardmerge.methods.sums import block_gram

        self.sums.add(block_gram(list(inputs), self.block), start // self.block)

    def in_any_order(self, pass_index: int) -> bool:
        """Any order: the Gram pass's block sums name their first block (BlockSums folds them
        in flat order), and the combine's chunks are independent."""
        return True

    def end_pass(self, pass_index: int) -> None:
        totals = self.sums.totals()
        k = self.count
        gram = [totals[i * k : (i + 1) * k] for i in range(k)]
        self.coefficients = karcher_coefficients(gram, self.max_iter, self.tol)

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:

        first = inputs[0]
        if self.count == 1:
            return first
        return weighted_sum(inputs, self.coefficients)


def weighted_sum(vectors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_i c_i v_i`` accumulated in float32 (float64 for float64) in order, rounded once to
    the vectors' dtype; a cache-sized piece at a time (no chunk-sized float32 temporaries)."""
    import torch

    from shardmerge.methods.sums import pieces

    first = vectors[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = torch.empty_like(first)
    for s, e in pieces(first.numel(), 1):
        result = torch.zeros(e - s, dtype=acc, device=first.device)
        for v, c in zip(vectors, coefficients, strict=True):
            if c != 0:
                result.add_(v[s:e].to(acc), alpha=c)
        out[s:e] = result
    return out


def karcher_coefficients(gram: Sequence[Sequence[float]], max_iter: int, tol: float) -> list[float]:
    """``a`` such that the merged tensor is ``sum_i a_i x_i``, from the Gram matrix of the x_i."""
    k = len(gram)
    alphas = [1.0 / k] * k
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k  # mergekit: every model is (nearly) zero; so is the mean
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    # Dot products of the unit vectors, and of two combinations of them.
    u = [[gram[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
    n = len(valid)

    def dot(p: Sequence[float], q: Sequence[float]) -> float:
        return sum(p[a] * u[a][b] * q[b] for a in range(n) for b in range(n))

    def norm(p: Sequence[float]) -> float:
        return math.sqrt(max(dot(p, p), 0.0))  # >= 0 up to rounding

    c = list(weights)
    mean_norm = norm(c)
    c = [1.0] + [0.0] * (n - 1) if mean_norm < tol else [x / mean_norm for x in c]
    for _ in range(max_iter):
        tangent = [0.0] * n
        for j in range(n):
            cos = min(1.0, max(-1.0, sum(u[j][b] * c[b] for b in range(n))))
            theta = math.acos(cos)
            # Already at the mean: no pull (theta / sin(theta) -> 1 times a zero vector). With
            # tol 0, mergekit divides 0 by 0 here and writes NaNs; the limit is 0.
            if theta < tol or theta == 0:
                continue
            f = weights[j] * theta / math.sin(theta)
            tangent[j] += f
            for b in range(n):
                tangent[b] -= f * cos * c[b]
        step = norm(tangent)
        if step < tol or step == 0:  # converged (mergekit: 0/0 with tol 0)
            break
        c = [
            math.cos(step) * x + math.sin(step) * y / step for x, y in zip(c, tangent, strict=True)
        ]
        unit = norm(c)
        if unit > tol:
            c = [x / unit for x in c]
    scale = sum(a * m for a, m in zip(alphas, norms, strict=True))
    coefficients = [0.0] * k
    for position, i in enumerate(valid):
        coefficients[i] = scale * c[position] / norms[i]
    return coefficients


METHOD = MethodSpec(
    name="karcher",
    base="none",
    params=(
        Param("max_iter", per_model=False, default=10, low=1, integer=True),
        Param("tol", per_model=False, default=1e-5, low=0),
    ),
    start=KarcherMerge,
    summary="Karcher mean: the models' Riemannian mean direction, scaled by their mean norm",
)
