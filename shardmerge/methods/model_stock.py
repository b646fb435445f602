"""``model_stock``: Model Stock (Jang et al. 2024): move from the base towards the models' average
by a ratio taken from how well their task vectors agree.

For base ``b`` and ``K >= 2`` models ``x_i`` with task vectors ``d_i = x_i - b``: ``c`` is the
mean over pairs of ``cos(d_i, d_j)`` over the whole tensor (per row, the last dimension, with
``filter_wise``), ``t = K c / (1 + (K - 1) c)`` (0 where the denominator is within 1e-6 of 0:
the base, as mergekit), and the result ``t * mean(x_i) + (1 - t) * b``.

One statistics pass (each task vector's squared norm and each pair's dot product, per row,
summed in float64; for 16-bit merges from float32 sums of blocks of at most 16 Ki elements, whose
terms are exact in float32), then the combine. The scalar arithmetic after the sums, and the combine, are mergekit
0.1.5's op for op in the merge dtype, so results agree with it bit for bit unless a norm or dot
product lands within float rounding of a bf16 boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, Param, TensorJob

if TYPE_CHECKING:
    import torch

# mergekit: a norm product below this is clamped (a zero task vector has cosine 0), and a
# denominator closer than this to 0 keeps the base rather than amplifying opposite updates.
NORM_PRODUCT_MIN = 1e-6
SINGULAR = 1e-6


class ModelStockMerge:
    def __init__(self, job: TensorJob) -> None:
        import torch

        from shardmerge.methods.sums import BlockSums

        self.dtype = job.dtype
        self.device = torch.device(job.device)
        self.count = len(job.model_params)
        self.filter_wise = bool(job.shared["filter_wise"])
        self.row = job.row_len or max(1, job.numel)  # the engine gives whole rows per chunk
        self.pairs = [(a, b) for a in range(self.count) for b in range(a + 1, self.count)]
        self.sums = BlockSums(self.count + len(self.pairs), keep_blocks=self.filter_wise)
        self.passes = 1 if job.numel else 0
        # 16-bit merges: squares and rounded products are exact in float32 (see reduce).
        self.blocks_f32 = self.dtype in (torch.bfloat16, torch.float16)
        self.t: torch.Tensor | None = None

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        import torch

        from shardmerge.methods.sums import pieces, row_sums_f32

        for s, e in pieces(inputs[0].numel(), self.row):
            base = inputs[0][s:e]
            offsets = [x[s:e] - base for x in inputs[1:]]  # in the merge dtype, as mergekit
            if self.blocks_f32:
                # Squares of 16-bit values and products rounded to them are exact in float32:
                # float32 sums of small blocks, added in float64 (sums.row_sums_f32).
                columns = []
                for d in offsets:
                    f = d.float()
                    columns.append(row_sums_f32(f.mul_(f), self.row))
                # mergekit rounds each product to the merge dtype before summing.
                columns += [row_sums_f32(offsets[a] * offsets[b], self.row) for a, b in self.pairs]
            else:  # float32/float64 merges: float64 throughout
                columns = [d.to(torch.float64).square().view(-1, self.row).sum(1) for d in offsets]
                columns += [
                    (offsets[a] * offsets[b]).to(torch.float64).view(-1, self.row).sum(1)
                    for a, b in self.pairs
                ]
            self.sums.add(torch.stack(columns, dim=1), (start + s) // self.row)

    def end_pass(self, pass_index: int) -> None:
        import torch

        if self.filter_wise:
            stats = self.sums.per_block()  # one row of sums per tensor row
        else:
            stats = torch.tensor([self.sums.totals()], dtype=torch.float64)
        self.t = interpolation_ratio(stats, self.count, self.pairs, self.dtype).to(self.device)
        del self.sums  # its per-row sums are no longer needed

    def in_any_order(self, pass_index: int) -> bool:
        """Any order: the statistics pass's block sums name their first row (BlockSums folds
        them in flat order whatever order they come in), and the combine's chunks are
        independent once the ratio is known."""
        return True

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        base, models = inputs[0], inputs[1:]
        if self.t is None:  # an empty tensor
            return base
        if self.filter_wise:
            first = start // self.row
            t = self.t[first : first + base.numel() // self.row].unsqueeze(-1)
            base, models = base.view(-1, self.row), [x.view(-1, self.row) for x in models]
        else:
            t = self.t
        average = sum(models) / self.count  # Python's sum: mergekit's order of roundings
        return (t * average + (1 - t) * base).reshape(-1)


def interpolation_ratio(
    stats: torch.Tensor, count: int, pairs: Sequence[tuple[int, int]], dtype: torch.dtype
) -> torch.Tensor:
    """Model Stock's t per row of ``stats`` (squared norms, then the pairs' dot products, float64
    sums), computed in ``dtype`` as mergekit computes it from its norms and sums."""
    import torch

    norms = stats[:, :count].sqrt().to(dtype)
    cosines = []
    for j, (a, b) in enumerate(pairs):
        product = norms[:, a] * norms[:, b]
        dot = stats[:, count + j].to(dtype)
        cosines.append((dot / product.clamp(min=NORM_PRODUCT_MIN)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)


METHOD = MethodSpec(
    name="model_stock",
    base="required",
    params=(Param("filter_wise", per_model=False, default=False, kind="bool"),),
    start=ModelStockMerge,
    summary="Model Stock: towards the models' average by a ratio from their task vectors' cosines",
    row_aligned=True,
    min_models=2,
)
