"""GPTQ (Frantar et al. 2023): quantize a linear layer column by column, spreading each
column's rounding error over the columns not yet quantized with the inverse Hessian of the
layer-wise least-squares problem (the same sweep as SparseGPT, shards/compress/obs.py).

The grid is fixed before the sweep ("static groups") and is exactly the one the serving kernel
computes with, so the compensated weights land on values the kernel reproduces bit for bit:
- w8a16: one bf16 scale per output row, q in -127..127, w = q * s;
- w4a16: per group of 32 inputs a bf16 scale d and bf16 zero z, q in 0..15,
  w = (q - 8) * d + z (`_weight_int4pack_mm_for_cpu`); a Q4 GGUF source's own grid when it has one;
- nf4: per group of 32 the absmax bitsandbytes will use after double quantization (8-bit
  absmax in blocks of 256, plus their mean), w = code[q] * absmax.

After the sweep the codes stay and the grid's own numbers (scales, int4's zeros) are refit by
least squares (`refit_`): with the codes fixed the weights are linear in them, so the output
error GPTQ minimizes has a closed-form minimum over them that the static grid, chosen by
round-to-nearest before the sweep, is not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shards.compress.int4 import Int4CpuLinear, rtn_grid
from shards.compress.obs import inverse_hessian, sweep
from shards.compress.quantize import Int8CpuLinear, int8_rows
from shards.compress.registry import METHODS, CompressionError, method

GROUP = 32
ROWS8, GROUPS4, NF4 = "int8-rows", "int4-groups", "nf4-blocks"   # grid kinds (registry Method.grid)
DAMP = 0.01     # of the mean diagonal of H: the paper's
ACT_ORDER = True
REFIT = True


@dataclass
class Grid:
    """A fixed quantization grid for one weight [N, K]: its kind and what its kernel needs."""

    kind: str                           # a registry Method's `grid`: ROWS8, GROUPS4 or NF4
    scale: torch.Tensor                 # ROWS8: [N]; GROUPS4: d [N, K/32]; NF4: absmax [N, K/32]
    zero: torch.Tensor | None = None    # GROUPS4: m = z - 8 d [N, K/32] (so w = q * d + m)
    state: object = None                # nf4: bitsandbytes' QuantState (its absmax double-quantized)

    def column(self, j: int, w: torch.Tensor) -> torch.Tensor:
        """Column j's values [N] on the grid (nearest point)."""
        if self.kind == ROWS8:
            return (w / self.scale).round_().clamp_(-127, 127) * self.scale
        s = self.scale[:, j // GROUP]
        if self.kind == GROUPS4:
            m = self.zero[:, j // GROUP]
            return ((w - m) / s).round_().clamp_(0, 15) * s + m
        code = _nf4_code()
        idx = torch.bucketize((w / s).clamp(-1, 1), (code[1:] + code[:-1]) / 2)
        return code[idx] * s

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Codes of w [N, K] already on the grid: int8 (w8a16), int32 0..15 (w4a16),
        uint8 code indices (nf4)."""
        if self.kind == ROWS8:
            return (w / self.scale[:, None]).round().to(torch.int8)
        g = w.reshape(w.shape[0], -1, GROUP)
        s = self.scale.unsqueeze(-1)
        if self.kind == GROUPS4:
            return ((g - self.zero.unsqueeze(-1)) / s).round().clamp(0, 15).reshape(w.shape).to(torch.int32)
        code = _nf4_code()
        return torch.bucketize((g / s).clamp(-1, 1), (code[1:] + code[:-1]) / 2).reshape(w.shape).to(torch.uint8)

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """What multiplies each of the grid's numbers, [N, groups, group width, numbers per group]:
        w[n, g*gs + i] = sum_f features[n, g, i, f] * params[n, g, f]."""
        n, k = codes.shape
        if self.kind == ROWS8:
            return codes.double().view(n, 1, k, 1)
        q = codes.long().view(n, k // GROUP, GROUP)
        if self.kind == GROUPS4:                  # w = q d + m
            return torch.stack([q.double(), torch.ones_like(q, dtype=torch.float64)], -1)
        return _nf4_code().double()[q].unsqueeze(-1)  # w = code[q] absmax

    def params(self) -> torch.Tensor:
        """[N, groups, numbers per group], in the order of `features`."""
        if self.kind == ROWS8:
            return self.scale.view(-1, 1, 1)
        if self.kind == GROUPS4:
            return torch.stack([self.scale, self.zero], -1)
        return self.scale.unsqueeze(-1)

    def set_params(self, p: torch.Tensor) -> None:
        """Take new params [N, groups, numbers per group], rounded as the kernel stores them."""
        if self.kind == ROWS8:
            self.scale = p.reshape(-1).to(torch.bfloat16).float()
        elif self.kind == GROUPS4:
            d16, z16 = p[..., 0].to(torch.bfloat16).float(), (p[..., 1] + 8 * p[..., 0]).to(torch.bfloat16).float()
            self.scale, self.zero = d16, z16 - 8 * d16
        else:
            self.scale = _double_quantize(p[..., 0].float(), self.state)

    def layer(self, w: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """The kernel module for weights w [N, K] that already lie on this grid (GPTQ's output):
        the same codes and scales, so it computes with exactly these weights."""
        if self.kind == GROUPS4:
            return Int4CpuLinear(w, bias, (self.scale, self.zero))
        if self.kind == ROWS8:
            q = Int8CpuLinear(qweight=self.codes(w), scales=self.scale.to(torch.bfloat16))
            q.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            return q
        import bitsandbytes as bnb
        codes = self.codes(w).reshape(-1)
        packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)     # bitsandbytes' nibble order
        q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=self.state, blocksize=32,
                                     compress_statistics=True, quant_type="nf4", bnb_quantized=True)
        if bias is not None:
            q.bias = nn.Parameter(bias.float(), requires_grad=False)
        return q

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """The weights [N, K] that `codes` stand for on this grid (what the kernel computes with)."""
        f = self.features(codes)
        return (f * self.params().double().unsqueeze(2)).sum(-1).reshape(codes.shape).float()


def _double_quantize(absmax: torch.Tensor, state) -> torch.Tensor:
    """Store absmax [N, groups] in bitsandbytes' QuantState as quantize_4bit would (8-bit codes
    in blocks of 256 around their mean); returns the absmax the kernel will compute with."""
    import bitsandbytes.functional as bnbf
    flat = absmax.reshape(-1).contiguous()
    offset = flat.mean()
    state.absmax, state.state2 = bnbf.quantize_blockwise(flat - offset, blocksize=256)
    state.offset = offset
    return _stored_absmax(state).reshape(absmax.shape)


def _stored_absmax(state) -> torch.Tensor:
    """The absmax [groups] bitsandbytes computes with, from its double-quantized QuantState."""
    import bitsandbytes.functional as bnbf
    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def _nf4_code() -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type
    return get_4bit_type("nf4", device="cpu").float()


def grid_tensors(grid: Grid) -> dict[str, torch.Tensor]:
    """The grid as named tensors (artifacts store them beside the on-grid weights)."""
    out = {"scale": grid.scale.contiguous()}
    if grid.zero is not None:
        out["zero"] = grid.zero.contiguous()
    if grid.state is not None:   # bitsandbytes' own packed form of its QuantState
        out.update({"state." + k: v.contiguous() for k, v in grid.state.as_dict(packed=True).items()})
    return out


def grid_from_tensors(quant: str, t: dict[str, torch.Tensor]) -> Grid:
    """An artifact's stored grid of a weight quantized at `quant` (a method name or alias)."""
    kind, state = method(quant).grid, None
    if kind == NF4:
        from bitsandbytes.functional import QuantState
        state = QuantState.from_dict({k[6:]: v for k, v in t.items() if k.startswith("state.")}, device="cpu")
    return Grid(kind, t["scale"], t.get("zero"), state)


def grid_for(w: torch.Tensor, quant: str, source_grid=None) -> Grid:
    """The round-to-nearest grid of w [N, K] at `quant`, rounded as the kernel stores it."""
    kind = method(quant).grid
    if kind is None:
        fits = ", ".join(m.name for m in METHODS if m.gptq)
        raise CompressionError(f"gptq supports {fits}, not {quant!r}")
    if kind != ROWS8 and w.shape[1] % GROUP:
        raise CompressionError(f"gptq at {quant} needs input widths divisible by {GROUP} (its groups), got "
                               f"{w.shape[1]}: a cut left that width; pick a cut fraction that keeps a multiple of "
                               f"{GROUP}, or w8a16+gptq")
    if kind == ROWS8:
        return Grid(kind, int8_rows(w)[1].float())
    if kind == GROUPS4:
        d, m = source_grid if source_grid is not None else rtn_grid(w)
        grid = Grid(kind, d, m)
        grid.set_params(torch.stack([d, m], -1))     # rounded as the kernel stores them
        return grid
    import bitsandbytes.functional as bnbf
    _, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=GROUP, compress_statistics=True,
                                  quant_type="nf4")
    return Grid(kind, _stored_absmax(state).reshape(w.shape[0], -1), state=state)


def gptq_(w: torch.Tensor, gram: torch.Tensor, n_tokens: int, grid: Grid, damp: float = DAMP,
          act_order: bool = ACT_ORDER, refit: bool = REFIT) -> torch.Tensor:
    """Quantize w [out, in] in place onto `grid` with GPTQ's error compensation; gram: X^T X
    [in, in] over n_tokens calibration tokens. act_order: columns with the largest Hessian
    diagonal first (groups stay where they are, so the kernel is unchanged). refit: then
    `refit_` the grid's numbers (the grid object changes). Returns w."""
    target = w.clone() if refit else None     # the weights the refit's output error is measured against
    perm = torch.argsort(torch.diag(gram), descending=True) if act_order else torch.arange(w.shape[1])
    wp = w[:, perm].contiguous()
    hinv = inverse_hessian(gram[perm][:, perm], n_tokens, wp, damp)
    sweep(wp, hinv, lambda j, i, w1, d: grid.column(int(perm[j]), w1[:, i]))
    w[:, perm] = wp
    if refit and not torch.equal(w, target):   # on its own grid already (a Q4 source): nothing to fit
        refit_(w, target, gram, grid)
    return w


def refit_(w: torch.Tensor, target: torch.Tensor, gram: torch.Tensor, grid: Grid, rows: int = 64) -> None:
    """With w's codes fixed, set the grid's numbers p (scales; int4's zeros too) to the
    minimum over p of each output row's (target - w(p)) X^T X (target - w(p))^T, which is
    quadratic in p: solve (F^T G F) p = F^T G target per row (F: `Grid.features`, one block of
    G = X^T X per pair of groups), plain least squares: a ridge of even 1e-9 of each diagonal
    moved nf4+gptq's perplexity by 0.16 (33.15 vs 32.99), these systems are that ill-conditioned.
    w takes the result as the kernel stores it. nf4+gptq, WikiText-2 8 x 512, calibrated on
    held-out WikiText: 33.46 -> 32.99 (per-layer output error -5%, median)."""
    codes = grid.codes(w)
    feats = grid.features(codes)                              # [N, G, gs, F]
    n, g, gs, f = feats.shape
    h = gram.double()
    h4 = h.view(g, gs, g, gs)
    a = torch.empty(n, g * f, g * f, dtype=torch.float64)
    for r in range(0, n, rows):                               # [rows, G, F, G, gs] at a time
        x = feats[r:r + rows]
        t = torch.einsum("ngif,gihj->ngfhj", x, h4)
        a[r:r + rows] = torch.einsum("ngfhj,nhje->ngfhe", t, x).reshape(-1, g * f, g * f)
    b = torch.einsum("ngif,ngi->ngf", feats, (target.double() @ h).view(n, g, gs)).reshape(n, g * f)
    old = grid.params().double().reshape(n, g * f)
    p, info = torch.linalg.solve_ex(a, b)
    p, old = p.view(n, g, f), old.view(n, g, f)
    # a singular row (a group of all-zero features) keeps its grid; a scale that came out <= 0
    # would flip or empty its group: the fit, not the data, chose it
    keep = (info == 0).view(n, 1, 1) & torch.isfinite(p).all(-1, keepdim=True) & (p[..., :1] > 0)
    grid.set_params(torch.where(keep, p, old))
    w.copy_(grid.values(codes))
