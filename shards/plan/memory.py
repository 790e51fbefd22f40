"""Memory model: measured bytes per layer and KV bytes per token (docs/design.md, "Memory model").

`ModelCosts` is a plain dataclass the planner reads; shards/compress/costs.py measures it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCosts:
    model: str
    n_layers: int
    layer_bytes: tuple[int, ...]      # resident bytes of each decoder layer, measured
    embed_bytes: int                  # token embedding (first shard)
    norm_bytes: int                   # final RMSNorm (last shard)
    head_bytes: int                   # lm_head (last shard); the embedding's size when tied
    tied: bool                        # lm_head shares the embedding's tensor
    kv_bytes_per_token_layer: int     # 2 * n_kv_heads * head_dim * KV dtype bytes
    head_compute: float               # lm_head multiply-adds per token, in units of one layer's
    # the shape, for the workspace (shards/plan/footprint.py); 0 where unknown
    hidden: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    vocab: int = 0
    source_layer_bytes: int = 0       # one decoder layer in fp32: what loading builds it from

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.n_layers


def head_dim(config) -> int:
    """Width of one attention head: the config's `head_dim` where it sets one (Qwen3, Gemma),
    else hidden_size / num_attention_heads (Llama, Qwen2)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token_layer(config, dtype_bytes: int = 4) -> int:
    return 2 * config.num_key_value_heads * head_dim(config) * dtype_bytes


def _side_tensors(t) -> list:
    """bitsandbytes keeps scales beside the weight: Int8Params.SCB, Params4bit.quant_state
    (absmax, code, and a nested state for double quantization)."""
    out = [getattr(t, "SCB", None)]
    qs = getattr(t, "quant_state", None)
    while qs is not None:
        out += [getattr(qs, a, None) for a in ("absmax", "code", "offset")]
        qs = getattr(qs, "state2", None)
    return [x for x in out if hasattr(x, "data_ptr") and hasattr(x, "nbytes")]


def module_bytes(module) -> int:
    """Resident bytes of a module's parameters, buffers and quantization side tensors,
    shared (tied) tensors once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        for x in [t] + _side_tensors(t):
            if x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.nbytes
    return total


