"""Unstructured pruning of a block's projections: magnitude, Wanda and 2:4 (zeros kept dense, so
bytes do not drop unless a kernel stores them sparse; the memory model counts real bytes)."""
from __future__ import annotations

import torch

from shards.compress.quantize import LINEARS


def magnitude_mask(w: torch.Tensor, sparsity: float, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask dropping the `sparsity` fraction of lowest scores in each output row. The score
    is |w|, or with input norms [in] Wanda's |w| * ||X_j|| (Sun et al. 2023, per-output groups)."""
    k = int(w.shape[1] * sparsity)
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    score = w.abs() if norms is None else w.abs() * norms.to(w.dtype).unsqueeze(0)
    drop = torch.topk(score, k, dim=1, largest=False).indices
    return torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)


def two_four_mask(w: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the 2 highest scores of every 4 consecutive inputs (NVIDIA's 2:4 pattern)."""
    out_f, in_f = w.shape
    score = w.abs() if norms is None else w.abs() * norms.to(w.dtype).unsqueeze(0)
    groups = score.reshape(out_f, in_f // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(out_f, in_f)


def prune_block(block, method: str, sparsity: float, norms: dict | None = None) -> None:
    """method: magnitude | wanda | 2:4 (by magnitude). norms[name]: input-column norms [in] per
    projection, for Wanda; without them Wanda falls back to |w| (the memory model: shapes only)."""
    for name in LINEARS:
        w = getattr(block, name).weight.data
        n = norms.get(name) if norms and method == "wanda" else None
        mask = two_four_mask(w, n) if method == "2:4" else magnitude_mask(w, sparsity, n)
        w.mul_(mask)
