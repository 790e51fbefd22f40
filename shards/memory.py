"""Memory model: measured bytes per layer and KV bytes per token (DESIGN.md section 5).

`ModelCosts` is a plain dataclass the planner reads. `measure_costs` builds each layer as a
stage would and counts the bytes of its real tensors, once per model + compression, cached on
disk beside the source's metadata.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


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

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.n_layers


def kv_bytes_per_token_layer(config, dtype_bytes: int = 4) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * dtype_bytes


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


def measure_costs(source, compression: str | None = None, use_cache: bool = True) -> ModelCosts:
    """Build every layer (one at a time, then dropped) and count its bytes."""
    from shards.block import compress_block, fp32_block
    from shards.stage import remaining
    cfg = source.config
    comp, todo = remaining(source, compression)
    key = f"costs-v2-{comp.spec}.json"   # v2: embedding / lm_head follow quantize.head_quant
    cache = getattr(source, "cache", None)
    if use_cache and cache is not None and (cache / key).is_file():
        d = json.loads((cache / key).read_text())
        return ModelCosts(**{**d, "model": source.label, "layer_bytes": tuple(d["layer_bytes"])})
    # Wanda and cuts ranked by weights alone give the calibrated shapes and bytes; layers a raw
    # source would drop are unknown before calibration, so counted (an upper bound)
    dropped = set(getattr(source, "dropped_layers", ()))
    layers = [0 if i in dropped else module_bytes(compress_block(fp32_block(source, i), todo))
              for i in range(cfg.num_hidden_layers)]
    # embedding and lm_head at the policy of quantize.head_quant (the norm stays fp32)
    from shards.quantize import head_table
    embed = source.tensor("model.embed_tokens.weight")
    norm = source.tensor("model.norm.weight")
    table = module_bytes(head_table(embed, comp.quant))
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.hidden_size * head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    costs = ModelCosts(
        model=source.label, n_layers=cfg.num_hidden_layers, layer_bytes=tuple(layers),
        embed_bytes=table, norm_bytes=norm.nbytes, head_bytes=table,
        tied=bool(cfg.tie_word_embeddings), kv_bytes_per_token_layer=kv_bytes_per_token_layer(cfg),
        head_compute=cfg.vocab_size * cfg.hidden_size / (mlp + attn))
    if use_cache and cache is not None:
        (cache / key).write_text(json.dumps(asdict(costs)))
    return costs
