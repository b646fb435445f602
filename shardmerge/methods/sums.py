"""Float64 sums over a whole tensor that do not depend on how it was cut into chunks.

A reduction pass sums each *block* (a row for row-aligned methods, else ``L1_BLOCK`` elements;
a chunk always holds whole blocks) in float64, keeps those block sums (one float64 per block and
quantity: a few bytes per thousand elements) and adds them exactly (``math.fsum``) when the pass
ends. The totals are then the same for any chunk size, device split or resume point.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BlockSums", "block_gram", "blocks"]


def blocks(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    """``x`` (flat) as 2-D views of whole ``block``-element blocks: the full ones, then the short
    tail (only the tensor's last chunk has one)."""
    n = x.numel()
    full = n - n % block
    views = [x[:full].view(-1, block)] if full else []
    if n > full:
        views.append(x[full:].view(1, -1))
    return views


class BlockSums:
    """Per-block float64 sums of ``width`` quantities, added up exactly by :meth:`totals`."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._parts: list[torch.Tensor] = []

    def add(self, sums: torch.Tensor) -> None:
        """One chunk's block sums, ``(blocks, width)`` float64, in flat order."""
        self._parts.append(sums.reshape(-1, self.width).to("cpu", torch.float64))

    def per_block(self) -> torch.Tensor:
        """Every block's sums, ``(blocks, width)``, in flat order."""
        if not self._parts:
            return torch.zeros(0, self.width, dtype=torch.float64)
        return torch.cat(self._parts)

    def totals(self) -> list[float]:
        """The exact sum of each quantity over all blocks, rounded once to float64."""
        return [math.fsum(column) for column in self.per_block().T.tolist()]


def block_gram(vectors: list[torch.Tensor], block: int) -> torch.Tensor:
    """Each block's Gram matrix of ``vectors`` (flat, same length), float64: ``(blocks, K*K)``."""
    x = torch.stack([v.to(torch.float64) for v in vectors])
    k, n = x.shape
    full = n - n % block
    parts = []
    if full:
        b = x[:, :full].view(k, -1, block).transpose(0, 1)  # (blocks, K, block)
        parts.append(torch.bmm(b, b.transpose(1, 2)).reshape(-1, k * k))
    if n > full:
        tail = x[:, full:]
        parts.append((tail @ tail.T).reshape(1, k * k))
    return torch.cat(parts) if parts else torch.zeros(0, k * k, dtype=torch.float64)
