"""Quantized replacements for a block's nn.Linear layers (DESIGN.md section 7).

bitsandbytes (imported only here, only when asked for): LLM.int8 (`Linear8bitLt`, outlier
threshold 6.0), 4-bit nf4/fp4 (`Linear4bit`, fp32 compute). Torch-native: bf16 weights, and
`int8-cpu`, per-output-channel int8 weights with `torch._weight_int8pack_mm` (bf16 activations),
the fastest CPU path measured in DESIGN.md for one row, and `w8a8-cpu`, int8 weights and
activations through `torch._int_mm`, the fastest from a few rows up.
"""
from __future__ import annotations

import torch
from torch import nn

LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # a Block's (fused) projections


class CastLinear(nn.Module):
    """Weights stored in `dtype`; input cast in, output cast back to the caller's dtype."""

    def __init__(self, lin: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row: (int8 [rows, in], bf16 scales [rows])."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.to(torch.bfloat16)


# `_weight_int8pack_mm` is a row-at-a-time kernel: its time grows linearly with the rows (60 us a
# row for 3072 x 576, 1 thread), while a fp32 GEMM on the dequantized weight reuses each weight
# across rows. Measured (us, 1 thread, rows 16 / 32 / 128 / 256): int8pack 958 / 1934 / 7569 /
# 15418, dequantize + fp32 mm 1289 / 1633 / 3754 / 6927. So prefill steps (x: [B, Q > 1, in])
# take the GEMM, with fp32 activations instead of bf16 ones (WikiText-2 ppl 30.64 -> 30.60,
# fp32's), and decode steps keep the packed kernel: a 256-token prefill through layers [0, 19)
# takes 354 ms instead of 663 at 1 thread, 215 instead of 367 at 2. The choice follows the
# step's kind, not its row count, so a sequence's numbers do not depend on what it is batched
# with: each kernel gives a row the same bits at any batch (MKL's sgemm does from 16 rows up,
# hence the padding), so greedy replies do not change with load.
GEMM_MIN_ROWS = 16
DEQUANT_CHUNK = 4096   # output channels dequantized at a time


class Int8CpuLinear(nn.Module):
    """int8 weights [out, in] with one bf16 scale per output channel (symmetric, absmax).
    two_level: prefill and decode steps multiply two int8 levels of the input instead of its
    bf16 copy or the fp32 GEMM (w8a8-cpu's down_proj; `two_level_mm`)."""

    def __init__(self, lin: nn.Linear | None = None, *, qweight=None, scales=None, two_level: bool = False):
        super().__init__()
        self.two_level = two_level
        if lin is not None:
            qweight, scales = int8_rows(lin.weight.detach())
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if lin is None or lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)

    @classmethod
    def from_rows(cls, read, n_rows: int, chunk: int = 4096) -> "Int8CpuLinear":
        """Quantize a weight `chunk` rows at a time; read(start, end) -> fp32 rows. Peak extra
        memory is one chunk, not the fp32 matrix (108 MiB for SmolLM2's embedding)."""
        parts = [int8_rows(read(a, min(a + chunk, n_rows))) for a in range(0, n_rows, chunk)]
        return cls(qweight=torch.cat([q for q, _ in parts]), scales=torch.cat([s for _, s in parts]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type != "cpu":  # the fused kernel is CPU/MPS only; elsewhere dequantize on the fly (gpt-fast)
            y = nn.functional.linear(x2.to(torch.bfloat16), self.qweight.to(torch.bfloat16)) * self.scales
        elif self.two_level:   # prefill and decode alike: the same numbers for a row either way
            y = two_level_mm(x2.float(), self.qweight) * self.scales.float()
        elif x.dim() == 3 and x.shape[1] > 1:    # a prefill step
            y = self._dequantized_mm(x2.float())
        else:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales)
        y = y.reshape(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of token ids [...] -> [..., in] fp32 (per-output-channel scales are
        per-row here)."""
        return self.qweight[ids].float() * self.scales[ids].float().unsqueeze(-1)

    def _dequantized_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in] fp32 -> [rows, out] through fp32 GEMMs over DEQUANT_CHUNK output channels
        at a time (the fp32 copy of one chunk is the only temporary: 9 MiB for SmolLM2's head)."""
        n, rows = self.qweight.shape[0], x2.shape[0]
        if rows < GEMM_MIN_ROWS:
            x2 = torch.cat([x2, x2.new_zeros(GEMM_MIN_ROWS - rows, x2.shape[1])])
        y = torch.cat([x2 @ self.qweight[a:a + DEQUANT_CHUNK].t().float() for a in range(0, n, DEQUANT_CHUNK)], 1)
        return y[:rows] * self.scales.float()


class W8A8CpuLinear(nn.Module):
    """w8a8-cpu: int8 weights [out, in] per output channel and int8 activations per token,
    multiplied in int32 by `torch._int_mm` (oneDNN, AVX512-VNNI here), after SmoothQuant's
    smoothing (shards/smoothing.py): the module holds W * s and divides its input by s.
    Measured (us, 3072 x 576, 1 thread, rows 1 / 8 / 16 / 32 / 256): the int8 GEMM 35 / 123 /
    159 / 277 / 1457 against `_weight_int8pack_mm`'s 119 / 465 / 857 / 1824 / 14656, since
    int8pack re-reads the weight for every row. Each row is quantized and multiplied on its own
    and integer sums are exact, so a row's result does not depend on its batch: prefill and
    decode use the same kernel, and perplexity measures what decode serves."""

    def __init__(self, lin: nn.Linear | None = None, act_max: torch.Tensor | None = None, *,
                 qweight=None, scales=None, inv_s=None):
        """act_max [in]: the input's channel maxima on calibration text; None: no smoothing
        (s = 1; the memory model's bytes, tests)."""
        super().__init__()
        if lin is not None:
            from shards.smoothing import smoothing_scales
            w = lin.weight.detach().float()
            s = torch.ones(w.shape[1]) if act_max is None else smoothing_scales(act_max, w)
            qweight, scales = int8_rows(w * s.to(w.device))
            inv_s = 1 / s
        self.register_buffer("qweight", qweight)              # [out, in] int8 codes of W * s
        self.register_buffer("scales", scales.float())        # [out]
        self.register_buffer("inv_s", inv_s.float().to(qweight.device))   # [in]
        self.bias = None if lin is None or lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)

    @classmethod
    def from_rows(cls, read, n_rows: int, act_max: torch.Tensor | None, chunk: int = 4096) -> "W8A8CpuLinear":
        """As Int8CpuLinear.from_rows: two passes of `chunk` rows (column maxima, then codes)."""
        from shards.smoothing import smoothing_scales
        s = None
        if act_max is not None:
            w_max = torch.stack([read(a, min(a + chunk, n_rows)).abs().amax(0)
                                 for a in range(0, n_rows, chunk)]).amax(0)
            s = smoothing_scales(act_max, w_max[None])
        parts = [int8_rows(read(a, min(a + chunk, n_rows)) * (1 if s is None else s))
                 for a in range(0, n_rows, chunk)]
        inv_s = torch.ones(parts[0][0].shape[1]) if s is None else 1 / s
        return cls(qweight=torch.cat([q for q, _ in parts]), scales=torch.cat([c for _, c in parts]), inv_s=inv_s)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of token ids: the stored rows are W * s, so divided by s again."""
        return self.qweight[ids].float() * self.scales[ids].unsqueeze(-1) * self.inv_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, sx = per_token_int8(x.reshape(-1, shape[-1]).float() * self.inv_s)
        y = (int8_mm(xq, self.qweight) * sx * self.scales).reshape(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] fp32 -> (int8 codes, fp32 scales [rows, 1]): symmetric absmax per row."""
    sx = x.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / sx).clamp(-127, 127).to(torch.int8), sx


def int8_mm(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """int8 [rows, in] x int8 codes [out, in] -> the exact sums, fp32 [rows, out]."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, qweight.t()).float()    # the [in, out] view: no copy
    return xq.float() @ qweight.float().t()   # CUDA's _int_mm wants rows > 16: the same sums in fp32


def two_level_mm(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """x [rows, in] fp32 times int8 codes [out, in] (unscaled): x = a * xa + b * xb per row, xa
    its int8 rounding and xb that of the residual (|residual| <= a / 2), two exact int8 GEMMs.
    The input keeps ~15 bits against its row's maximum, where bf16 keeps 8 per element:
    down_proj's input (SiLU(gate) * up) has outliers a single int8 level loses the rest of the
    row to (whole model: 30.79-31.14 against 30.64). Measured, 576 x 1536, 1 thread, eager, an
    input channel 100x loud: relative error 3.3e-4 vs 2.4e-3 for `_weight_int8pack_mm`'s bf16
    input, 287 vs 400 us at 16 rows (README, "Where the time goes")."""
    xa, a = per_token_int8(x)
    xb, b = per_token_int8(x - xa.float() * a)
    return int8_mm(xa, qweight) * a + int8_mm(xb, qweight) * b


class Int8Embedding(nn.Module):
    """Token embedding read from an int8 table's own rows (`rows(ids)`: Int8CpuLinear,
    W8A8CpuLinear, w4a8-cpu's Q8Linear). Tied models share the table with their lm_head."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)


def head_quant(quant: str) -> str:
    """Embedding / lm_head policy: fp32 and bf16 keep their dtype; every other quantization
    stores the (tied, 49152 x 576) table as int8 rows with per-row scales. It is the largest
    tensor (28 M parameters: 108 MiB fp32) and the largest matmul of a decode step, and
    `_weight_int8pack_mm` is the fastest CPU kernel measured (DESIGN.md section 7); w8a8-cpu's
    head is W8A8 too (its largest win: 17.2 -> 6.9 ms at 16 rows, eager, 1 thread), and
    w4a8-cpu's is 8-bit groups through its kernel (shards/qmatmul.py::Q8Linear: a Q8_0 source's
    own table)."""
    return quant if quant in ("fp32", "bf16", "w8a8-cpu", "w4a8-cpu") else "int8-cpu"


def head_table(weight: torch.Tensor, quant: str) -> nn.Module:
    """The embedding / lm_head table as `quant`'s policy stores it (the memory model's bytes)."""
    q = head_quant(quant)
    if q == "w4a8-cpu":
        from shards.qmatmul import Q8Linear
        return Q8Linear.from_rows(lambda a, b: weight[a:b].float(), weight.shape[0])
    return quantize_linear(linear(weight), q)


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear around existing tensors (no fresh allocation)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _bnb(lin: nn.Linear, quant: str, device) -> nn.Module:
    import bitsandbytes as bnb
    out_f, in_f = lin.weight.shape
    w = lin.weight.detach().to(torch.float32).cpu()
    if quant == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=lin.bias is not None, has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        # blocks of 32 (the GGUF's own Q4_1 block) with double-quantized absmax: measured at nf4,
        # WikiText-2 seqlen 512 x 4: ppl 37.49 at 162 MiB vs 38.49 at 165 MiB with the default 64
        q = bnb.nn.Linear4bit(in_f, out_f, bias=lin.bias is not None, compute_dtype=torch.float32,
                              quant_type=quant, compress_statistics=True)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant, blocksize=32,
                                     compress_statistics=True)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().float().cpu(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes on this move


def quantize_linear(lin: nn.Linear, quant: str, grid=None, act_max: torch.Tensor | None = None) -> nn.Module:
    """grid: a GPTQ grid (shards/gptq.py; the weights lie on it, their codes are kept), or
    int4-cpu's (d, m) per group of 32 when the source stored the weight as 4-bit groups (its
    own codes are kept); None rounds to nearest. act_max: w8a8-cpu's input channel maxima."""
    if quant == "fp32":
        return lin
    if quant == "w8a8-cpu":
        return W8A8CpuLinear(lin, act_max)
    if hasattr(grid, "codes"):
        return _on_grid(lin, grid)
    if quant == "int4-cpu":
        from shards.int4 import Int4CpuLinear
        return Int4CpuLinear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), grid)
    if quant == "w4a8-cpu":
        from shards.qmatmul import W4A8CpuLinear
        return W4A8CpuLinear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), grid)
    if quant == "bf16":
        return CastLinear(lin, torch.bfloat16)
    if quant == "int8-cpu":
        return Int8CpuLinear(lin)
    if quant in ("int8", "nf4", "fp4"):
        return _bnb(lin, quant, lin.weight.device)
    raise ValueError(f"unknown quantization {quant!r}")


def _on_grid(lin: nn.Linear, grid) -> nn.Module:
    """The kernel module for weights that already lie on `grid` (GPTQ's output): the same
    codes and scales, so it computes with exactly these weights."""
    w, bias = lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach()
    if grid.quant == "int4-cpu":
        from shards.int4 import Int4CpuLinear
        return Int4CpuLinear(w, bias, (grid.scale, grid.zero))
    if grid.quant == "int8-cpu":
        q = Int8CpuLinear(qweight=grid.codes(w), scales=grid.scale.to(torch.bfloat16))
        q.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return q
    import bitsandbytes as bnb
    codes = grid.codes(w).reshape(-1)
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)     # bitsandbytes' nibble order
    q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                          quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=grid.state, blocksize=32,
                                 compress_statistics=True, quant_type="nf4", bnb_quantized=True)
    if bias is not None:
        q.bias = nn.Parameter(bias.float(), requires_grad=False)
    return q


def quantize_block(block: nn.Module, quant: str, grids: dict | None = None, maxima: dict | None = None) -> nn.Module:
    """Replace the block's projections in place; norms stay fp32 (they are 576 floats).
    grids: {projection: (d, m)} of a 4-bit source, for int4-cpu (see quantize_linear).
    maxima: {projection: act_max} for w8a8-cpu, whose down_proj is int8-cpu with two-level int8
    decode (shards/smoothing.py, two_level_mm)."""
    from shards.smoothing import SMOOTHED
    for name in LINEARS:
        lin = getattr(block, name)
        if quant == "w8a8-cpu" and name not in SMOOTHED:     # weight-only int8, two-level decode
            q = Int8CpuLinear(lin, two_level=True)
        else:
            q = quantize_linear(lin, quant, (grids or {}).get(name), (maxima or {}).get(name))
        setattr(block, name, q)
    return block
