"""Unstructured pruning of a block's projections: magnitude and 2:4 (zeros kept dense, so
bytes do not drop unless a kernel stores them sparse; the memory model counts real bytes)."""
from __future__ import annotations

import torch

from shards.quantize import LINEARS


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the `sparsity` fraction of smallest |w| in each output row."""
    k = int(w.shape[1] * sparsity)
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    drop = torch.topk(w.abs(), k, dim=1, largest=False).indices
    return torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (NVIDIA's 2:4 pattern)."""
    out_f, in_f = w.shape
    groups = w.abs().reshape(out_f, in_f // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(out_f, in_f)


def prune_block(block, method: str, sparsity: float) -> None:
    for name in LINEARS:
        w = getattr(block, name).weight.data
        mask = two_four_mask(w) if method == "2:4" else magnitude_mask(w, sparsity)
        w.mul_(mask)
