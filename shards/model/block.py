"""A decoder layer (Block) of a Llama-family model, built from only its tensors, and its
compression: cuts and pruning, then quantization of its projections.

The block is written over the loaded weights (as gpt-fast and vLLM do) because continuous
batching needs the paged per-sequence KV cache in kv_cache.py. It matches transformers'
LlamaDecoderLayer (tests/test_split_equals_whole.py states the tolerance); stage.py chains
blocks into a stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shards.compress.quantize import linear
from shards.model import attention
from shards.model.kv_cache import PagedKV
from shards.model.source import ModelSource, has_qkv_bias, layer_tensor_names, optional_tensor_names
from shards.plan.memory import head_dim


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight, requires_grad=False), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 like transformers' LlamaRMSNorm (one fused op), then back to the compute dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """One query token per sequence. q: [B, heads, hd]; keys, values: [kv_heads, B, T, hd]
    (PagedKV.gather); bias: [B, 1, T] (0 or -inf). Two batched matmuls per KV head group: CPU
    SDPA's flash kernel is slow for a single query (docs/performance.md, "Decode attention"), and GQA needs no
    K/V repeat. Returns [B, heads, hd]."""
    b, nh, hd = q.shape
    nkv = keys.shape[0]
    qg = q.view(b, nkv, nh // nkv, hd).transpose(0, 1)                   # [kv, B, group, hd]
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * hd ** -0.5 + bias  # [kv, B, group, T]
    out = torch.matmul(scores.softmax(-1), values)                        # [kv, B, group, hd]
    return out.transpose(0, 1).reshape(b, nh, hd)


def _cat(*ts):
    return None if ts[0] is None else torch.cat(ts)


class Block(nn.Module):
    """RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU, both with residuals.

    Projections are fused as vLLM fuses them: qkv_proj rows are [q | k | v], gate_up_proj rows
    [gate | up] (one matmul each; fewer Python ops per layer). Pruning is per output row, so it
    is the same on the fused matrices; cuts slice their sections (shards/compress/cut.py).
    """

    def __init__(self, t: dict[str, torch.Tensor], cfg, layer: int):
        super().__init__()
        p = f"model.layers.{layer}."
        get = lambda n: t.get(p + n)  # noqa: E731
        self.layer = layer
        self.head_dim = head_dim(cfg)
        # head counts from the weights: a cut block (shards/compress/cut.py) has fewer query heads
        self.n_heads = get("self_attn.q_proj.weight").shape[0] // self.head_dim
        self.n_kv = get("self_attn.k_proj.weight").shape[0] // self.head_dim
        self.attn_norm = RMSNorm(get("input_layernorm.weight"), cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(get("post_attention_layernorm.weight"), cfg.rms_norm_eps)
        qkv = [f"self_attn.{x}_proj." for x in "qkv"]
        self.qkv_proj = linear(torch.cat([get(n + "weight") for n in qkv]), _cat(*[get(n + "bias") for n in qkv]))
        self.o_proj = linear(get("self_attn.o_proj.weight"), get("self_attn.o_proj.bias"))
        self.gate_up_proj = linear(torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]))
        self.down_proj = linear(get("mlp.down_proj.weight"), get("mlp.down_proj.bias"))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [..., hidden] -> q [..., heads, hd], k and v [..., kv_heads, hd], RoPE applied to q
        and k at once (cos, sin broadcast over the heads axis)."""
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(self.attn_norm(x)).view(*x.shape[:-1], nh + 2 * nkv, hd)
        qk = qkv[..., :nh + nkv, :]
        qk = qk * cos + rotate_half(qk) * sin
        return qk[..., :nh, :], qk[..., nh:, :], qkv[..., nh + nkv:, :]

    def out(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x plus the attention output a [..., heads * hd] through o_proj, then the MLP, each
        with its residual."""
        x = x + self.o_proj(a)
        gate, up = self.gate_up_proj(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def forward(self, x, rope, kv: PagedKV, ctx) -> torch.Tensor:
        """x: [B, Q, hidden]; rope: (cos, sin) [B, Q, 1, head_dim]; ctx: StepContext. The
        compiled decode step (shards/model/compiled.py) runs the same qkv and out."""
        b, q, _ = x.shape
        qh, k, v = self.qkv(x, *rope)                                  # [B, Q, heads | kv, hd]
        kv.write(self.layer, ctx.slots, k.reshape(b * q, self.n_kv, -1), v.reshape(b * q, self.n_kv, -1))
        pool = kv.pools[self.layer]
        if q == 1 and attention.supports(pool[0], self.n_heads, self.n_kv):   # reads the pool in place
            a = torch.ops.shardserve.paged_decode_attention(qh[:, 0], *pool, ctx.block_ids, ctx.decode_lens,
                                                            self.head_dim ** -0.5)
            return self.out(x, a.reshape(b, q, -1))
        keys, values = kv.gather(self.layer, ctx.block_ids)           # [kv_heads, B, T, hd]
        if q == 1:
            a = decode_attention(qh[:, 0], keys, values, ctx.decode_bias)   # [B, heads, hd]
        else:
            a = F.scaled_dot_product_attention(qh.transpose(1, 2), keys.transpose(0, 1),
                                               values.transpose(0, 1), attn_mask=ctx.mask,
                                               enable_gqa=True).transpose(1, 2)
        return self.out(x, a.reshape(b, q, -1))


def fp32_block(source: ModelSource, layer: int, device="cpu", dtype=torch.float32) -> Block:
    """One decoder layer built from only its tensors."""
    names = layer_tensor_names(layer, has_qkv_bias(source.config))
    names += [n for n in optional_tensor_names(layer) if source.has(n)]
    return Block({n: source.tensor(n).to(device=device, dtype=dtype) for n in names}, source.config, layer)


