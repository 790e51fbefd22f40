"""GPTQ (Frantar et al. 2023): quantize a linear layer column by column, spreading each
column's rounding error over the columns not yet quantized with the inverse Hessian of the
layer-wise least-squares problem (the same sweep as SparseGPT, shards/obs.py).

The grid is fixed before the sweep ("static groups") and is exactly the one the serving kernel
computes with, so the compensated weights land on values the kernel reproduces bit for bit:
- int8-cpu: one bf16 scale per output row, q in -127..127, w = q * s;
- int4-cpu: per group of 32 inputs a bf16 scale d and bf16 zero z, q in 0..15,
  w = (q - 8) * d + z (`_weight_int4pack_mm_for_cpu`); a Q4 GGUF source's own grid when it has one;
- nf4: per group of 32 the absmax bitsandbytes will use after double quantization (8-bit
  absmax in blocks of 256, plus their mean), w = code[q] * absmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shards.obs import inverse_hessian, sweep

GROUP = 32
DAMP = 0.01     # of the mean diagonal of H: the paper's
ACT_ORDER = True


@dataclass
class Grid:
    """A fixed quantization grid for one weight [N, K]: `quant` and what its kernel needs."""

    quant: str
    scale: torch.Tensor                 # int8-cpu: [N]; int4-cpu: d [N, K/32]; nf4: absmax [N, K/32]
    zero: torch.Tensor | None = None    # int4-cpu: m = z - 8 d [N, K/32] (so w = q * d + m)
    state: object = None                # nf4: bitsandbytes' QuantState (its absmax double-quantized)

    def column(self, j: int, w: torch.Tensor) -> torch.Tensor:
        """Column j's values [N] on the grid (nearest point)."""
        if self.quant == "int8-cpu":
            return (w / self.scale).round_().clamp_(-127, 127) * self.scale
        s = self.scale[:, j // GROUP]
        if self.quant == "int4-cpu":
            m = self.zero[:, j // GROUP]
            return ((w - m) / s).round_().clamp_(0, 15) * s + m
        code = _nf4_code()
        idx = torch.bucketize((w / s).clamp(-1, 1), (code[1:] + code[:-1]) / 2)
        return code[idx] * s

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Codes of w [N, K] already on the grid: int8 (int8-cpu), int32 0..15 (int4-cpu),
        uint8 code indices (nf4)."""
        if self.quant == "int8-cpu":
            return (w / self.scale[:, None]).round().to(torch.int8)
        g = w.reshape(w.shape[0], -1, GROUP)
        s = self.scale.unsqueeze(-1)
        if self.quant == "int4-cpu":
            return ((g - self.zero.unsqueeze(-1)) / s).round().clamp(0, 15).reshape(w.shape).to(torch.int32)
        code = _nf4_code()
        return torch.bucketize((g / s).clamp(-1, 1), (code[1:] + code[:-1]) / 2).reshape(w.shape).to(torch.uint8)


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
    state = None
    if quant == "nf4":
        from bitsandbytes.functional import QuantState
        state = QuantState.from_dict({k[6:]: v for k, v in t.items() if k.startswith("state.")}, device="cpu")
    return Grid(quant, t["scale"], t.get("zero"), state)


def grid_for(w: torch.Tensor, quant: str, source_grid=None) -> Grid:
    """The round-to-nearest grid of w [N, K] at `quant`, rounded as the kernel stores it."""
    if quant != "int8-cpu" and w.shape[1] % GROUP:
        from shards.compression import CompressionError
        raise CompressionError(f"gptq at {quant} needs input widths divisible by {GROUP} (its groups), got "
                               f"{w.shape[1]}: a cut left that width; pick a cut fraction that keeps a multiple of "
                               f"{GROUP}, or int8-cpu+gptq")
    if quant == "int8-cpu":
        from shards.quantize import int8_rows
        return Grid(quant, int8_rows(w)[1].float())
    if quant == "int4-cpu":
        from shards.int4 import rtn_grid
        d, m = source_grid if source_grid is not None else rtn_grid(w)
        d16, z16 = d.to(torch.bfloat16).float(), (m + 8 * d).to(torch.bfloat16).float()
        return Grid(quant, d16, z16 - 8 * d16)
    if quant == "nf4":
        import bitsandbytes.functional as bnbf
        _, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=GROUP, compress_statistics=True,
                                      quant_type="nf4")
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return Grid(quant, absmax.float().reshape(w.shape[0], -1), state=state)
    raise ValueError(f"gptq supports int8-cpu, int4-cpu and nf4, not {quant!r}")


def gptq_(w: torch.Tensor, gram: torch.Tensor, n_tokens: int, grid: Grid, damp: float = DAMP,
          act_order: bool = ACT_ORDER) -> torch.Tensor:
    """Quantize w [out, in] in place onto `grid` with GPTQ's error compensation; gram: X^T X
    [in, in] over n_tokens calibration tokens. act_order: columns with the largest Hessian
    diagonal first (the grid stays fixed, so the kernel is unchanged). Returns w."""
    perm = torch.argsort(torch.diag(gram), descending=True) if act_order else torch.arange(w.shape[1])
    wp = w[:, perm].contiguous()
    hinv = inverse_hessian(gram[perm][:, perm], n_tokens, wp, damp)
    sweep(wp, hinv, lambda j, i, w1, d: grid.column(int(perm[j]), w1[:, i]))
    w[:, perm] = wp
    return w
