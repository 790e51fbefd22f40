"""w4a16: group-wise affine 4-bit weights served by torch's CPU int4 kernel.

A weight row is cut into groups of 32 along the input dimension; each group stores 4-bit codes
q in 0..15, a scale d and a minimum m, and w = d * q + m. That is exactly GGUF's Q4_1 block
(Q4_0 is the case m = -8 d), and exactly the kernel's format with scale d and zero m + 8 d
(`_weight_int4pack_mm_for_cpu` computes (q - 8) * scale + zero). So from a Q4 GGUF source the
shard keeps the file's own codes ("snapping" the dequantized weights back onto their grid
recovers them exactly); from any other source it rounds to nearest on a per-group min/max grid.
"""
from __future__ import annotations

import torch
from torch import nn

from shards import compat

GROUP = 32
QUANT_ROWS = 1024   # rows quantized at a time: the fp32 temporaries are of a block, not the matrix
_INT4PACK_CONVERT, _INT4PACK_MM = compat.int4pack_convert(), compat.int4pack_mm()   # read once: graphs trace the ops


def rtn_grid(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest grid of w [N, K]: (d, m), each [N, K / group], from each group's range."""
    g = w.float().reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    return torch.where(d > 0, d, torch.ones_like(d)), lo


def codes_on(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """4-bit codes of w [N, K] on the grid (d, m): q = round((w - m) / d) in 0..15, int32;
    QUANT_ROWS rows at a time through one fp32 scratch block, every step in place: a fresh
    temporary per step page-faulted its memory in each time (1.37 -> 0.4 s for 16384 x 2048,
    2 threads), and loading a 4-bit model is mostly this."""
    n, k = w.shape
    out = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    d = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(-1)   # a constant group (d = 0): every code 0
    m = m.unsqueeze(-1)
    scratch = torch.empty(min(n, QUANT_ROWS), k // group, group, device=w.device)
    for a in range(0, n, QUANT_ROWS):
        g = w[a:a + QUANT_ROWS].reshape(-1, k // group, group)
        x = scratch[:len(g)]
        torch.sub(g, m[a:a + QUANT_ROWS], out=x)
        x.div_(d[a:a + QUANT_ROWS]).round_().clamp_(0, 15)
        out[a:a + QUANT_ROWS] = x.reshape(-1, k)
    return out


class Int4CpuLinear(nn.Module):
    """y = x @ W^T (+ bias), W held as packed 4-bit codes + per-group bf16 scale and zero.

    The kernel runs with bf16 activations and bf16 scales: with fp32 ones it takes a slow path
    (576 -> 1536, 2 threads, us at batch 1 / 8 / 32: fp32 946 / 7655 / 29108, bf16 36 / 114 / 439;
    fp32 dense 47 / 98 / 285, w8a16 46 / 144 / 517)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 grid: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        n, k = weight.shape
        if k % GROUP or n % 16:
            raise ValueError(f"w4a16 needs input widths divisible by {GROUP} and output widths by 16 "
                             f"(the kernel's tiles), got {n} x {k}")
        d, m = grid if grid is not None else rtn_grid(weight)
        q = codes_on(weight, d, m)
        self.register_buffer("packed", _INT4PACK_CONVERT(q, 1))
        # [K / group, N, 2]: (scale, zero) with zero = m + 8 d, as the kernel reads them
        self.register_buffer("scales_zeros", torch.stack([d, m + 8 * d], -1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.in_features, self.out_features = k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _INT4PACK_MM(x.reshape(-1, shape[-1]).to(torch.bfloat16),
                                                      self.packed, GROUP, self.scales_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] the kernel computes with (tests, GPTQ's grid check)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return _INT4PACK_MM(eye, self.packed, GROUP, self.scales_zeros).t().float()


def q4_grid(raw, gtype: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(d, m) of a GGUF Q4_0 / Q4_1 tensor's raw blocks (uint8 [N, K / 32 * bytes per block]),
    each [N, K / 32] fp32; None for any other type."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    if gtype not in (T.Q4_0, T.Q4_1):
        return None
    per = 18 if gtype == T.Q4_0 else 20          # fp16 d (+ fp16 m), 16 bytes of nibbles
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, per)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = -8 * d if gtype == T.Q4_0 else blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return torch.from_numpy(d), torch.from_numpy(m)


def from_linear(lin: nn.Linear, _method, grid=None, _act_max=None) -> "Int4CpuLinear":
    """w4a16's module for one projection (the registry's factory); grid: a GPTQ grid's or a Q4
    source's (d, m)."""
    return Int4CpuLinear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), grid)
