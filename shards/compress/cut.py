"""Structured cuts that physically shrink a block's matrices (docs/compression.md).

Importance scores follow Wanda's |W| x ||X|| idea, per unit instead of per weight:
- MLP neuron j: ||X_down[:, j]|| * ||W_down[:, j]||, X_down = silu(gate(h)) * up(h), the
  neuron's activation; removing it drops its gate and up rows and column j of down.
- query head h: sum over its head_dim columns of ||X_o[:, c]|| * ||W_o[:, c]||. Heads are cut
  in equal numbers from every KV group, so grouped-query attention keeps its shape and the
  K/V cache is untouched.
- layer: mean cosine similarity between its input and output hidden states (ShortGPT's
  block influence is 1 - that); the layers that change their input least go first.
With `norms=None` (no calibration: the memory model only needs shapes) weight norms rank alone.
What the removed units did is restored where measurement said it pays (WikiText-2, seqlen 512):
a cut MLP refits down_proj's kept columns by least squares pulled toward their old values
(refit_toward, strength 1.0) and folds the output's mean residual into a bias: 53.50 at
cut-mlp:0.2 over 8 windows, vs 56.12 with FLAP's mean bias alone (strength 0.1 56.21, 0.3
54.33, 3 54.99, 10 55.69: chosen on those windows; a plain ridge refit toward zero fit the
chat-prompt calibration set and made it 68 over 4); cut heads refit o_proj by least squares on
the 576-wide attention output (57 vs 191 without and 118 with the mean bias, 4 windows).
"""
from __future__ import annotations

import torch
from torch import nn

from shards.compress.spec import CompressionError

MULTIPLE = 8   # kept MLP widths are multiples of this (matmul-friendly shapes)


def keep_count(n: int, fraction: float, multiple: int = 1) -> int:
    keep = int(n * (1 - fraction)) // multiple * multiple
    if keep < multiple or keep >= n:
        raise CompressionError(f"cutting {fraction:g} of {n} units leaves {keep}; pick a fraction "
                               f"that removes at least one and keeps at least {multiple}")
    return keep


def _rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.data[idx].clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[idx].clone(), requires_grad=False)
    lin.out_features = len(idx)


def _cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.data[:, idx].clone(), requires_grad=False)
    lin.in_features = len(idx)


def refit(w: torch.Tensor, gram: torch.Tensor, idx: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Least-squares W' [out, k] with X_k W'^T ~ X W^T over the calibration tokens.
    gram: X^T X [in, in]. Normal equations: W' = W G[:, k] (G[k, k] + lambda I)^-1."""
    g = gram.double()
    gkk = g[idx][:, idx]
    lam = ridge * gkk.diagonal().mean()
    rhs = w.double() @ g[:, idx]                                   # [out, k]
    sol = torch.linalg.solve(gkk + lam * torch.eye(len(idx), dtype=g.dtype), rhs.T).T
    return sol.to(w.dtype).contiguous()


def refit_toward(w: torch.Tensor, gram: torch.Tensor, idx: torch.Tensor, strength: float) -> torch.Tensor:
    """W' [out, k] minimising ||X_k W'^T - X W^T||^2 + lambda ||W' - W_k||^2: least squares
    pulled toward the kept columns as they were (lambda = strength x mean diag of G[k, k]), so
    a small calibration set cannot drag the weights far. W' = (W G[:, k] + lambda W_k)(G_kk + lambda I)^-1."""
    g = gram.double()
    gkk = g[idx][:, idx]
    lam = strength * gkk.diagonal().mean()
    rhs = w.double() @ g[:, idx] + lam * w.double()[:, idx]
    sol = torch.linalg.solve(gkk + lam * torch.eye(len(idx), dtype=g.dtype), rhs.T).T
    return sol.to(w.dtype).contiguous()


def compensate(lin: nn.Linear, removed: torch.Tensor, means: torch.Tensor) -> None:
    """Fold the removed inputs' mean contribution into a bias (FLAP's compensation):
    bias += W[:, removed] @ mean(X[:, removed])."""
    extra = lin.weight.data[:, removed] @ means[removed].to(lin.weight.dtype)
    lin.bias = nn.Parameter(extra if lin.bias is None else lin.bias.data + extra, requires_grad=False)


REFIT_STRENGTH = 1.0   # lambda / mean diag of G[k, k] in refit_toward (see above); 0: FLAP's bias only


def cut_mlp(block, fraction: float, norms: torch.Tensor | None = None,
            means: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Drop the least important `fraction` of MLP neurons; returns the kept indices. With the
    down_proj inputs' gram, the kept columns are refit toward the full output (refit_toward)
    and the mean of what remains folds into a bias; with means only, the removed neurons' mean."""
    w_down = block.down_proj.weight.data                           # [hidden, inter]
    inter = w_down.shape[1]
    up_rows = block.gate_up_proj.weight.data[inter:]               # rows [gate | up]
    score = w_down.norm(dim=0) * (norms if norms is not None else up_rows.norm(dim=1))
    keep = score.topk(keep_count(inter, fraction, MULTIPLE)).indices.sort().values
    new_w = None
    if gram is not None and REFIT_STRENGTH:
        new_w = refit_toward(w_down, gram, keep, REFIT_STRENGTH)
        extra = w_down @ means - new_w @ means[keep]             # the output's mean left over
        b = block.down_proj.bias
        block.down_proj.bias = nn.Parameter(extra if b is None else b.data + extra, requires_grad=False)
    elif means is not None:
        compensate(block.down_proj, _others(keep, inter), means)
    _rows(block.gate_up_proj, torch.cat([keep, keep + inter]))
    _cols(block.down_proj, keep)
    if new_w is not None:
        block.down_proj.weight = nn.Parameter(new_w, requires_grad=False)
    return keep


def _others(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


def cut_heads(block, fraction: float, norms: torch.Tensor | None = None,
              gram: torch.Tensor | None = None) -> torch.Tensor:
    """Drop the same number of query heads from every KV group; returns kept o_proj columns."""
    hd, n_kv = block.head_dim, block.n_kv
    n_heads = block.n_heads
    per_group = n_heads // n_kv
    keep_per = per_group - round(per_group * fraction)
    if not 0 < keep_per < per_group:
        raise CompressionError(f"cut-heads:{fraction:g} removes {per_group - keep_per} of {per_group} "
                               f"query heads per KV group; it must remove at least one and keep one")
    w_o = block.o_proj.weight.data                                 # [hidden, heads * head_dim]
    col = w_o.norm(dim=0) * (norms if norms is not None else 1.0)
    score = col.view(n_kv, per_group, hd).sum(-1)                  # [groups, heads per group]
    heads = score.topk(keep_per, dim=1).indices.sort(dim=1).values + \
        torch.arange(n_kv).unsqueeze(1) * per_group                # [groups, kept] global head ids
    keep = (heads.reshape(-1, 1) * hd + torch.arange(hd)).reshape(-1)
    kv_rows = torch.arange(n_heads * hd, block.qkv_proj.weight.shape[0])
    _rows(block.qkv_proj, torch.cat([keep, kv_rows]))               # rows [q | k | v]: cut q only
    _cols(block.o_proj, keep)
    if gram is not None:
        block.o_proj.weight = nn.Parameter(refit(w_o, gram, keep), requires_grad=False)
    block.n_heads = n_kv * keep_per
    return keep


def layer_similarity(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """Mean cosine similarity over tokens of a layer's input and output, [..., hidden] each."""
    return nn.functional.cosine_similarity(x_in.flatten(0, -2).float(), x_out.flatten(0, -2).float(),
                                           dim=-1).mean().item()


def layers_to_drop(similarity: dict[int, float], n: int) -> list[int]:
    """The n layers whose output is most like their input."""
    if not 0 < n < len(similarity):
        raise CompressionError(f"drop-layers:{n} on {len(similarity)} layers; must leave at least one")
    return sorted(sorted(similarity, key=similarity.get, reverse=True)[:n])
