"""Quantized replacements for a block's nn.Linear layers (DESIGN.md section 7).

bitsandbytes (imported only here, only when asked for): LLM.int8 (`Linear8bitLt`, outlier
threshold 6.0), 4-bit nf4/fp4 (`Linear4bit`, fp32 compute). Torch-native: bf16 weights, and
`int8-cpu`, per-output-channel int8 weights with `torch._weight_int8pack_mm` (bf16 activations),
the fastest CPU path measured in DESIGN.md.
"""
from __future__ import annotations

import torch
from torch import nn

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CastLinear(nn.Module):
    """Weights stored in `dtype`; input cast in, output cast back to the caller's dtype."""

    def __init__(self, lin: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Int8CpuLinear(nn.Module):
    """int8 weights [out, in] with one bf16 scale per output channel (symmetric, absmax)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scales)
        y = y.reshape(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _bnb(lin: nn.Linear, quant: str, device) -> nn.Module:
    import bitsandbytes as bnb
    out_f, in_f = lin.weight.shape
    w = lin.weight.detach().to(torch.float32).cpu()
    if quant == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=lin.bias is not None, has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(in_f, out_f, bias=lin.bias is not None, compute_dtype=torch.float32, quant_type=quant)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().float().cpu(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes on this move


def quantize_linear(lin: nn.Linear, quant: str) -> nn.Module:
    if quant == "fp32":
        return lin
    if quant == "bf16":
        return CastLinear(lin, torch.bfloat16)
    if quant == "int8-cpu":
        return Int8CpuLinear(lin)
    if quant in ("int8", "nf4", "fp4"):
        return _bnb(lin, quant, lin.weight.device)
    raise ValueError(f"unknown quantization {quant!r}")


def quantize_block(block: nn.Module, quant: str) -> nn.Module:
    """Replace the block's seven projections in place; norms stay fp32 (they are 576 floats)."""
    for name in LINEARS:
        setattr(block, name, quantize_linear(getattr(block, name), quant))
    return block
