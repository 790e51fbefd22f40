"""The Optimal Brain Surgeon column sweep that SparseGPT (shards/compress/sparsegpt.py) and GPTQ
(shards/compress/gptq.py) share: change a linear layer's weights one input column at a time (to zero,
or onto a quantization grid) and spread each change's error over the columns not yet visited
with the inverse Hessian of the layer-wise least-squares problem, H = 2 X^T X / n (X: the
layer's calibration inputs). Lazy batch updates in blocks of 128 columns, as in both papers.
"""
from __future__ import annotations

from typing import Callable

import torch

BLOCK = 128


def inverse_hessian(gram: torch.Tensor, n_tokens: int, w: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 [in, in], H = 2 X^T X / n plus `damp` x its mean diagonal;
    inputs that never fire (a zero diagonal) are zeroed in w, in place, with a unit diagonal."""
    h = 2 * gram.double() / n_tokens
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True).float()


Column = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def sweep(w: torch.Tensor, hinv: torch.Tensor, column: Column,
          begin: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """In place over w [out, in]. For each block of columns, begin(a, w1, d) may look at the
    block (w1: its current weights [out, block], d: diag of its H^-1 [1, block]); then
    column(j, i, w1, d) gives the new value of column j = a + i ([out]) from the current ones."""
    cols = w.shape[1]
    for a in range(0, cols, BLOCK):
        b = min(a + BLOCK, cols)
        w1, h1 = w[:, a:b].clone(), hinv[a:b, a:b]
        err = torch.zeros_like(w1)
        d = torch.diag(h1).unsqueeze(0)
        if begin is not None:
            begin(a, w1, d)
        for i in range(b - a):
            q = column(a + i, i, w1, d)
            e = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)     # spread the error right
            w1[:, i] = q
            err[:, i] = e
        w[:, a:b] = w1
        w[:, b:] -= err @ hinv[a:b, b:]
