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

from shards import attention
from shards.compression import FOUR_BIT, Compression
from shards.kv_cache import PagedKV
from shards.quantize import linear
from shards.source import ModelSource, has_qkv_bias, layer_tensor_names, optional_tensor_names

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
    SDPA's flash kernel is slow for a single query (DESIGN.md section 8), and GQA needs no
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
    is the same on the fused matrices; cuts slice their sections (shards/cut.py).
    """

    def __init__(self, t: dict[str, torch.Tensor], cfg, layer: int):
        super().__init__()
        p = f"model.layers.{layer}."
        get = lambda n: t.get(p + n)  # noqa: E731
        self.layer = layer
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # head counts from the weights: a cut block (shards/cut.py) has fewer query heads
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
        compiled decode step (shards/compiled.py) runs the same qkv and out."""
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


def compress_block(block: Block, comp: Compression, source: ModelSource | None = None,
                   maxima: dict | None = None) -> Block:
    """Cut and prune (fp32 weights; ranked by weights alone, since calibrated blocks come from
    shards/calibration.py already cut), then quantize the block's projections, per `comp`.
    With `source`, int4-cpu and w4a8-cpu keep a 4-bit source's own codes where the weights are unchanged.
    maxima: w8a8-cpu's {projection: act_max} for this layer (shards/smoothing.py)."""
    from shards.calibration import compress_structure
    compress_structure(block, comp)
    if comp.quant != "fp32":
        from shards.quantize import quantize_block
        keep = comp.quant in FOUR_BIT and source is not None and comp.structure == Compression()
        # GPTQ (shards/calibration.py, or a prepared artifact) gave grids its weights lie on
        grids = getattr(block, "grids", None) or \
            (source.gptq_grids(block.layer) if source is not None and source.gptq_quant == comp.quant else None) or \
            (int4_grids(source, block.layer) if keep else None)
        quantize_block(block, comp.quant, grids, maxima)
    return block


def int4_grids(source: ModelSource, layer: int) -> dict:
    """{projection: (d, m)} of the source's 4-bit groups, fused as the block fuses its
    projections; a projection whose parts are not all 4-bit groups is left out."""
    import torch
    p = f"model.layers.{layer}."
    parts = {"qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "o_proj": ["self_attn.o_proj"], "gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
             "down_proj": ["mlp.down_proj"]}
    out = {}
    for proj, names in parts.items():
        grids = [source.int4_grid(p + n + ".weight") for n in names]
        if all(g is not None for g in grids):
            out[proj] = tuple(torch.cat([g[i] for g in grids]) for i in range(2))
    return out


def fp32_block(source: ModelSource, layer: int, device="cpu", dtype=torch.float32) -> Block:
    """One decoder layer built from only its tensors."""
    names = layer_tensor_names(layer, has_qkv_bias(source.config))
    names += [n for n in optional_tensor_names(layer) if source.has(n)]
    return Block({n: source.tensor(n).to(device=device, dtype=dtype) for n in names}, source.config, layer)
