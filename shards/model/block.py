"""A decoder layer (Block) of a Llama-family model, built from only its tensors, and its
compression: cuts and pruning, then quantization of its projections.

The block is written over the loaded weights (as gpt-fast and vLLM do) because continuous
batching needs the paged per-sequence KV cache in kv_cache.py. It matches transformers'
LlamaDecoderLayer (tests/test_split_equals_whole.py states the tolerance); stage.py chains
blocks into a stage.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shards.compress.quantize import linear
from shards.model import attention
from shards.model.kv_cache import PagedKV
from shards.model.source import ModelSource, has_qkv_bias, layer_tensor_names, optional_tensor_names
from shards.plan.memory import head_dim

Finish = Callable[[str, nn.Linear], nn.Module]   # (projection name, its fp32 Linear) -> what the Block keeps


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

    def __init__(self, t, cfg, layer: int, finish: Finish | None = None):
        """t: the layer's tensors by name, a dict or LayerTensors (read as taken); each is
        dropped once fused. finish(name, linear) replaces each projection as soon as it is
        built (shards/compress/apply.py quantizes there), so loading never holds the whole
        layer in fp32."""
        super().__init__()
        p = f"model.layers.{layer}."
        t = dict(t) if isinstance(t, dict) else t
        get = lambda n: t.pop(p + n, None)  # noqa: E731
        done = finish or (lambda name, lin: lin)
        self.layer = layer
        self.head_dim = head_dim(cfg)
        self.attn_norm = RMSNorm(get("input_layernorm.weight"), cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(get("post_attention_layernorm.weight"), cfg.rms_norm_eps)
        qkv = [f"self_attn.{x}_proj." for x in "qkv"]
        parts = [get(n + "weight") for n in qkv]
        # head counts from the weights: a cut block (shards/compress/cut.py) has fewer query heads
        self.n_heads, self.n_kv = parts[0].shape[0] // self.head_dim, parts[1].shape[0] // self.head_dim
        self.qkv_proj = done("qkv_proj", linear(torch.cat(parts), _cat(*[get(n + "bias") for n in qkv])))
        del parts
        self.o_proj = done("o_proj", linear(get("self_attn.o_proj.weight"), get("self_attn.o_proj.bias")))
        self.gate_up_proj = done("gate_up_proj", linear(torch.cat([get("mlp.gate_proj.weight"),
                                                                   get("mlp.up_proj.weight")])))
        self.down_proj = done("down_proj", linear(get("mlp.down_proj.weight"), get("mlp.down_proj.bias")))

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


class LayerTensors:
    """A layer's tensors, each read from the source (as `dtype` on `device`) when the Block
    takes it: with Block's `finish`, loading holds one projection group, not the layer."""

    def __init__(self, source: ModelSource, names: list[str], device, dtype):
        self.source, self.names, self.device, self.dtype = source, set(names), device, dtype

    def pop(self, name: str, default=None):
        if name not in self.names:
            return default
        self.names.discard(name)
        return self.source.tensor(name).to(device=self.device, dtype=self.dtype)


def fp32_block(source: ModelSource, layer: int, device="cpu", dtype=torch.float32,
               finish: Finish | None = None) -> Block:
    """One decoder layer built from only its tensors; finish: see Block."""
    names = layer_tensor_names(layer, has_qkv_bias(source.config))
    names += [n for n in optional_tensor_names(layer) if source.has(n)]
    return Block(LayerTensors(source, names, device, dtype), source.config, layer, finish)


