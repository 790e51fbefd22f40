"""Quantized replacements for a block's nn.Linear layers and the embedding / lm_head tables,
one factory per registry method (shards/compress/registry.py; docs/compression.md).

bitsandbytes (imported only here, only when asked for): LLM.int8 (`Linear8bitLt`, outlier
threshold 6.0), 4-bit nf4/fp4 (`Linear4bit`, fp32 compute). Torch-native: bf16 weights;
`w8a16`, per-output-channel int8 weights with `torch._weight_int8pack_mm` (bf16 activations),
the fastest CPU path measured for one row; and `w8a8`, int8 weights and activations through
`torch._int_mm`, the fastest from a few rows up (shards/compat.py wraps both private ops).
"""
from __future__ import annotations

import torch
from torch import nn

from shards import compat
from shards.compress.int4 import QUANT_ROWS
from shards.compress.registry import Method, method
from shards.compress.smoothing import SMOOTHED, smoothing_scales
from shards.plan.footprint import DEQUANT_BYTES

_INT8PACK_MM, _INT_MM = compat.int8pack_mm(), compat.int_mm()   # read once: graphs trace the ops
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # a Block's (fused) projections


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear around existing tensors (no fresh allocation)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class CastLinear(nn.Module):
    """Weights stored in `dtype`; input cast in, output cast back to the caller's dtype."""

    def __init__(self, lin: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row: (int8 [rows, in], bf16 scales [rows]); QUANT_ROWS rows at
    a time through one fp32 scratch block, in place (as int4.codes_on, for the same reason)."""
    n, k = w.shape
    q, scales = torch.empty(n, k, dtype=torch.int8, device=w.device), torch.empty(n, device=w.device)
    scratch = torch.empty(min(n, QUANT_ROWS), k, device=w.device)
    for a in range(0, n, QUANT_ROWS):
        rows = w[a:a + QUANT_ROWS].float()
        x = scratch[:len(rows)]
        s = torch.amax(torch.abs(rows, out=x), dim=1).div_(127.0).clamp_(min=1e-8)
        torch.div(rows, s[:, None], out=x).round_().clamp_(-127, 127)
        q[a:a + QUANT_ROWS], scales[a:a + QUANT_ROWS] = x, s
    return q, scales.to(torch.bfloat16)


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
DEQUANT_ROWS = 4096


class Int8CpuLinear(nn.Module):
    """int8 weights [out, in] with one bf16 scale per output channel (symmetric, absmax).
    two_level: prefill and decode steps multiply two int8 levels of the input instead of its
    bf16 copy or the fp32 GEMM (w8a8's down_proj; `two_level_mm`)."""

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
            y = _INT8PACK_MM(x2.to(torch.bfloat16), self.qweight, self.scales)
        y = y.reshape(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of token ids [...] -> [..., in] fp32 (per-output-channel scales are
        per-row here)."""
        return self.qweight[ids].float() * self.scales[ids].float().unsqueeze(-1)

    def _dequantized_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in] fp32 -> [rows, out] through fp32 GEMMs over DEQUANT_ROWS output channels
        at a time, fewer where their fp32 copy would pass DEQUANT_BYTES (1024 of a 8192-wide
        down_proj): that copy is the only temporary besides the output."""
        (n, k), rows = self.qweight.shape, x2.shape[0]
        chunk = min(DEQUANT_ROWS, max(GEMM_MIN_ROWS, DEQUANT_BYTES // (4 * k)))
        if rows < GEMM_MIN_ROWS:
            x2 = torch.cat([x2, x2.new_zeros(GEMM_MIN_ROWS - rows, x2.shape[1])])
        y = torch.cat([x2 @ self.qweight[a:a + chunk].t().float() for a in range(0, n, chunk)], 1)
        return y[:rows] * self.scales.float()


class W8A8CpuLinear(nn.Module):
    """w8a8: int8 weights [out, in] per output channel and int8 activations per token,
    multiplied in int32 by `torch._int_mm` (oneDNN, AVX512-VNNI here), after SmoothQuant's
    smoothing (shards/compress/smoothing.py): the module holds W * s and divides its input by s.
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
        return _INT_MM(xq, qweight.t()).float()    # the [in, out] view: no copy
    return xq.float() @ qweight.float().t()   # CUDA's _int_mm wants rows > 16: the same sums in fp32


def two_level_mm(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """x [rows, in] fp32 times int8 codes [out, in] (unscaled): x = a * xa + b * xb per row, xa
    its int8 rounding and xb that of the residual (|residual| <= a / 2), two exact int8 GEMMs.
    The input keeps ~15 bits against its row's maximum, where bf16 keeps 8 per element:
    down_proj's input (SiLU(gate) * up) has outliers a single int8 level loses the rest of the
    row to (whole model: 30.79-31.14 against 30.64). Measured, 576 x 1536, 1 thread, eager, an
    input channel 100x loud: relative error 3.3e-4 vs 2.4e-3 for `_weight_int8pack_mm`'s bf16
    input, 287 vs 400 us at 16 rows (docs/performance.md)."""
    xa, a = per_token_int8(x)
    xb, b = per_token_int8(x - xa.float() * a)
    return int8_mm(xa, qweight) * a + int8_mm(xb, qweight) * b


class Int8Embedding(nn.Module):
    """Token embedding read from an int8 table's own rows (`rows(ids)`: Int8CpuLinear,
    W8A8CpuLinear, w4a8x2's Q8Linear). Tied models share the table with their lm_head."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)


def head_table(weight: torch.Tensor, quant: str) -> nn.Module:
    """The embedding / lm_head table as `quant`'s method stores it (the memory model's bytes)."""
    return method(quant).make_table()(lambda a, b: weight[a:b].float(), weight.shape[0], None, True)


# The tables: (read(start, end) -> fp32 rows, n_rows, act_max, head) -> module; head: it serves
# as lm_head (an untied embedding is only read by row). The tied 49152 x 576
# table of the default model is its largest tensor (108 MiB fp32) and the largest matmul of a
# decode step: every method but fp32 and bf16 stores it as int8 rows read a chunk at a time
# (the whole fp32 table never exists), through `_weight_int8pack_mm`, the fastest CPU kernel
# measured (docs/performance.md); w8a8's lm_head is W8A8 too (17.2 -> 6.9 ms at 16 rows, eager,
# 1 thread), w4a8x2's is 8-bit groups through its kernel (shards/compress/qmatmul.py::q8_table).
def fp32_table(read, n_rows: int, _act_max=None, _head: bool = True) -> nn.Module:
    return linear(read(0, n_rows))


def bf16_table(read, n_rows: int, _act_max=None, _head: bool = True) -> nn.Module:
    """bf16 rows, read QUANT_ROWS at a time: the fp32 copy is of a block, not of the table."""
    first = read(0, min(QUANT_ROWS, n_rows))
    w = torch.empty(n_rows, first.shape[1], dtype=torch.bfloat16, device=first.device)
    w[:len(first)] = first
    for a in range(len(first), n_rows, QUANT_ROWS):
        w[a:a + QUANT_ROWS] = read(a, min(a + QUANT_ROWS, n_rows))
    return CastLinear(linear(w), torch.bfloat16)


def int8_table(read, n_rows: int, _act_max=None, _head: bool = True) -> nn.Module:
    return Int8CpuLinear.from_rows(read, n_rows)


def w8a8_table(read, n_rows: int, act_max: torch.Tensor | None, head: bool = True) -> nn.Module:
    """As lm_head: W8A8, smoothed by its input maxima act_max (None: unsmoothed, the memory
    model's bytes); an embedding that is only read by row keeps weight-only int8 rows."""
    return W8A8CpuLinear.from_rows(read, n_rows, act_max) if head else int8_table(read, n_rows)


def keep(lin: nn.Linear, *_) -> nn.Module:
    """fp32: the projection as loaded."""
    return lin


def bf16_linear(lin: nn.Linear, *_) -> nn.Module:
    return CastLinear(lin, torch.bfloat16)


def int8_linear(lin: nn.Linear, *_) -> nn.Module:
    return Int8CpuLinear(lin)


def w8a8_linear(lin: nn.Linear, _m, _grid, act_max: torch.Tensor | None) -> nn.Module:
    return W8A8CpuLinear(lin, act_max)


def bnb_linear(lin: nn.Linear, m: Method, *_) -> nn.Module:
    """bitsandbytes' LLM.int8 (`Linear8bitLt`, outlier threshold 6.0) or 4-bit (`Linear4bit`,
    nf4 / fp4 by `m.variant`, fp32 compute); bitsandbytes is imported only here."""
    import bitsandbytes as bnb
    out_f, in_f = lin.weight.shape
    w = lin.weight.detach().to(torch.float32).cpu()
    if m.variant == "8bit":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=lin.bias is not None, has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        # blocks of 32 (the GGUF's own Q4_1 block) with double-quantized absmax: measured at nf4,
        # WikiText-2 seqlen 512 x 4: ppl 37.49 at 162 MiB vs 38.49 at 165 MiB with the default 64
        q = bnb.nn.Linear4bit(in_f, out_f, bias=lin.bias is not None, compute_dtype=torch.float32,
                              quant_type=m.variant, compress_statistics=True)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=m.variant, blocksize=32,
                                     compress_statistics=True)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().float().cpu(), requires_grad=False)
    return q.to(lin.weight.device)  # bitsandbytes quantizes on this move


def quantize_linear(lin: nn.Linear, quant: str, grid=None, act_max: torch.Tensor | None = None) -> nn.Module:
    """grid: a GPTQ grid (shards/compress/gptq.py; the weights lie on it, their codes are kept),
    or a 4-bit method's (d, m) per group of 32 when the source stored the weight as 4-bit groups
    (its own codes are kept); None rounds to nearest. act_max: w8a8's input channel maxima."""
    if hasattr(grid, "codes"):
        return grid.layer(lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach())
    m = method(quant)
    return m.make_layer()(lin, m, grid, act_max)


def quantize_block(block: nn.Module, quant: str, grids: dict | None = None, maxima: dict | None = None) -> nn.Module:
    """Replace the block's projections in place; norms stay fp32 (they are 576 floats).
    grids: {projection: (d, m)} of a 4-bit source, for w4a16 (see quantize_linear).
    maxima: {projection: act_max} for w8a8, whose down_proj is w8a16 with two-level int8
    decode (shards/compress/smoothing.py, two_level_mm)."""
    for name in LINEARS:
        setattr(block, name, quantize_projection(name, getattr(block, name), quant, grids, maxima))
    return block


def quantize_projection(name: str, lin: nn.Linear, quant: str, grids: dict | None = None,
                        maxima: dict | None = None) -> nn.Module:
    """One of a block's projections (`name` in LINEARS) at `quant`; grids, maxima as quantize_block's."""
    if method(quant).act_maxima and name not in SMOOTHED:     # weight-only int8, two-level decode
        return Int8CpuLinear(lin, two_level=True)
    return quantize_linear(lin, quant, (grids or {}).get(name), (maxima or {}).get(name))
