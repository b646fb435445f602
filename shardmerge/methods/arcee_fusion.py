"""``arcee_fusion``: Arcee Fusion (mergekit 0.1.5): the model's value where its change from the
base matters most, the base's elsewhere.

For base ``b`` and one model ``x`` (in the merge dtype), per element
``importance = |x - b| * KL(p || q)``, with ``p = softmax(x) + 1e-8`` and ``q = softmax(b) +
1e-8`` over each row (the last dimension) and the KL summed over the row; the threshold is
``median + 1.5 (q3 - q1)`` of the importances over the whole tensor (their quartiles); the result
is ``b + (x - b)`` where ``importance >= threshold``, ``b`` elsewhere. Every op is mergekit's, in
its order and dtype.

The quartiles are the importances at ascending positions ``floor(q (n - 1))``. mergekit sorts
the whole tensor's importances to find them, or, above a million elements, a random sample of a
million drawn from torch's global generator (so its result changes from run to run, and its
sort holds the sample). Here they are always the exact ones of the whole tensor, found as the
magnitude selection of ``ties`` finds its threshold: a histogram of the importances' bit
patterns in one pass (two radix passes for float32 merges), a few hundred KiB of counters. Up to
a million elements that is mergekit's result bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardmerge.methods.spec import MethodSpec, TensorJob

if TYPE_CHECKING:
    import torch

    from shardmerge.methods.select import KeySpace

# mergekit's softmax offset and its interquartile multiplier.
SOFTMAX_EPS = 1e-8
IQR_SCALE = 1.5
QUARTILES = (0.25, 0.5, 0.75)
# 16-bit merges keep the first pass's order keys (2 bytes an element, outside malloc's heap) for
# the combine, instead of computing the importances again, for tensors up to this many
# elements (64 MiB of keys).
KEY_CACHE_NUMEL = 1 << 25


class ArceeFusionMerge:
    def __init__(self, job: TensorJob) -> None:
        import torch

        from shardmerge.methods.select import RankSelector

        self.job = job
        self.dtype = job.dtype
        self.row = job.row_len or max(1, job.numel)  # chunks hold whole rows
        self.space = order_space(job.dtype)
        n = job.numel
        # Ascending positions of the quartiles; the selector finds the m-th largest key, the
        # element at ascending position n - m. Position 0 (tensors of up to four elements) is
        # the smallest key, which the selector does not look for: kept apart.
        self.positions = [int(q * (n - 1)) for q in QUARTILES] if n else []
        self.selector = RankSelector(n, tuple(n - i for i in self.positions), self.space)
        self.passes = max(1, self.selector.passes) if n else 0
        self._smallest: int | None = None
        self._kept: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.threshold: torch.Tensor | None = None
        self._cached: torch.Tensor | None = None  # int16 keys - 32768, by element
        self._cache = job.dtype in (torch.bfloat16, torch.float16) and 0 < n <= KEY_CACHE_NUMEL

    def in_any_order(self, pass_index: int) -> bool:
        """Histograms add up in any order, and the combine's chunks are independent."""
        return True

    def reduce(self, pass_index: int, inputs: Sequence[torch.Tensor], start: int) -> None:
        import torch

        from shardmerge import heap

        keys = order_keys(importance(inputs[0], inputs[1], self.row))
        if pass_index == 0 and self._cache:
            with self._lock:
                if self._cached is None:
                    self._cached = heap.outside_heap(self.job.numel, torch.int16, keys.device)
            self._cached[start : start + keys.numel()] = keys - 0x8000
        if pass_index == 0:
            smallest = int(keys.min())
            with self._lock:
                if self._smallest is None or smallest < self._smallest:
                    self._smallest = smallest
        if pass_index < self.selector.passes:
            self.selector.add(keys)

    def end_pass(self, pass_index: int) -> None:
        if pass_index < self.selector.passes:
            self.selector.end_pass()
        if pass_index < self.passes - 1:
            return
        if self.selector.passes == 0:
            self.selector.finish_without_passes()
        keys = [
            self._smallest if i == 0 else th.key_t
            for i, th in zip(self.positions, self.selector.thresholds, strict=True)
        ]
        assert all(k is not None for k in keys)
        q1, median, q3 = (key_value(int(k), self.dtype) for k in keys)  # type: ignore[arg-type]
        self.threshold = median + IQR_SCALE * (q3 - q1)

    def combine(self, inputs: Sequence[torch.Tensor], start: int) -> torch.Tensor:
        base, model = inputs[0], inputs[1]
        if self.threshold is None:  # an empty tensor
            return base
        if self._cached is not None:
            keep = self._cached_keep(start, base.numel())
        else:
            keep = importance(base, model, self.row) >= self.threshold.to(base.device)
        count = keep.sum()
        with self._lock:
            self._kept = count if self._kept is None else self._kept + count
        # mergekit multiplies the change by a float32 mask and adds the base in float32: the
        # same values as these ops in the merge dtype, once rounded to it. With an output
        # dtype of its own, the float32 sum goes out unrounded (the engine rounds it once).
        change = (model - base) * keep.to(base.dtype)
        if self.job.wider_result():
            return base.float() + change.float()
        return base + change

    def _cached_keep(self, start: int, count: int) -> torch.Tensor:
        """``importance >= threshold`` from the kept order keys: -0 and +0 compare equal, and a
        NaN is never kept (nor is anything when the threshold is a NaN)."""
        import torch

        assert self._cached is not None and self.threshold is not None
        keys = self._cached[start : start + count]
        value = self.threshold.reshape(1)
        if bool(value.isnan()):
            return torch.zeros(count, dtype=torch.bool, device=keys.device)
        # The lowest key equal to the threshold: -0's for a zero.
        lowest = order_keys(value.abs().neg() if float(value) == 0 else value)
        at_least = keys >= int(lowest) - 0x8000
        return at_least.logical_and_(keys != 0xFFFF - 0x8000)  # NaN keys are the highest

    def statistics(self) -> dict[str, object]:
        """How many elements took the model's value (:mod:`shardmerge.mergestats`)."""
        return {"kept": [0 if self._kept is None else int(self._kept.item())]}


def importance(base: torch.Tensor, model: torch.Tensor, row: int) -> torch.Tensor:
    """mergekit's ``_compute_importance`` of flat whole rows: ``|x - b|`` times the row's
    ``sum(p * log(p / q))``, in the merge dtype; flat again."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own spelling

    x, b = model.view(-1, row), base.view(-1, row)
    diff = (x - b).abs()
    # ``tensor + python float``: the CPU rounds the float to the tensor's dtype first, CUDA
    # adds it in float32; rounding it here gives mergekit's CPU result on every device.
    eps = torch.tensor(SOFTMAX_EPS, dtype=x.dtype).item()
    p = F.softmax(x, dim=-1) + eps
    q = F.softmax(b, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (diff * kl).view(-1)


def order_space(dtype: torch.dtype) -> KeySpace:
    """The radix passes over :func:`order_keys` of ``dtype``: one of 16 bits for 16-bit
    floats, two for float32."""
    import torch

    from shardmerge.methods.select import KeySpace

    if dtype in (torch.bfloat16, torch.float16):
        return KeySpace(16, (0,))
    if dtype == torch.float32:
        return KeySpace(32, (16, 0))
    raise ValueError(f"arcee_fusion supports 16- and 32-bit merge dtypes, not {dtype}")


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys (int32 for 16-bit floats, int64 for float32) whose order is the order of
    ``x``'s values, as torch.sort orders them: negatives (by decreasing magnitude), -0 just
    below +0, positives, and every NaN above +inf (the highest key). A negative's bits are all
    flipped, a non-negative's sign bit is set."""
    import torch

    bits = 16 if x.dtype in (torch.bfloat16, torch.float16) else 32
    signed = torch.int16 if bits == 16 else torch.int32
    wide = torch.int32 if bits == 16 else torch.int64
    full = (1 << bits) - 1
    sign = 1 << (bits - 1)
    u = x.view(signed).to(wide).bitwise_and_(full)
    flips = (u >> (bits - 1)).mul_(full ^ sign).bitwise_or_(sign)
    keys = u.bitwise_xor(flips)
    inf = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}[x.dtype]
    return keys.masked_fill_(u.bitwise_and_(sign - 1) > inf, full)


def key_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    """The value (a 0-dim tensor of ``dtype``) whose :func:`order_keys` key is ``key``."""
    import torch

    bits = 16 if dtype in (torch.bfloat16, torch.float16) else 32
    sign = 1 << (bits - 1)
    u = key ^ sign if key & sign else key ^ ((1 << bits) - 1)
    if u & sign:  # back to the signed integer of the same bits
        u -= 1 << bits
    signed = torch.int16 if bits == 16 else torch.int32
    return torch.tensor(u, dtype=signed).view(dtype)


METHOD = MethodSpec(
    name="arcee_fusion",
    base="required",
    params=(),
    start=ArceeFusionMerge,
    summary="Arcee Fusion: the model's value where its change is important, the base's elsewhere",
    row_aligned=True,
    min_models=1,
    max_models=1,
)
