"""Measured bytes of a model's layers at a compression: the memory model's input
(shards/plan/memory.py::ModelCosts). Builds a layer as a stage would (every layer where cuts
make them differ) and counts the bytes of its real tensors, once per model + compression,
cached beside the source's metadata where the source has a cache (GGUF files, artifacts)."""
from __future__ import annotations

import json
from dataclasses import asdict

from shards.compress.apply import build_block, remaining
from shards.compress.quantize import head_table
from shards.compress.spec import Compression
from shards.plan.memory import ModelCosts, head_dim, kv_bytes_per_token_layer, module_bytes


def measure_costs(source, compression: str | None = None, use_cache: bool = True) -> ModelCosts:
    """Build a layer (or each, one at a time, then dropped) and count its bytes."""
    cfg = source.config
    comp, todo = remaining(source, compression)
    key = f"costs-v6-{comp.spec}.json"   # v6: symmetric groups keep d alone (qmatmul.pack)
    cache = getattr(source, "cache", None)
    if use_cache and cache is not None and (cache / key).is_file():
        d = json.loads((cache / key).read_text())
        return ModelCosts(**{**d, "model": source.label, "layer_bytes": tuple(d["layer_bytes"])})
    dropped = set(getattr(source, "dropped_layers", ()))
    if todo.structure == Compression() and getattr(source, "applied", None) is None:
        # nothing cuts a layer: every layer has the config's one shape, so one is measured
        layers = [module_bytes(build_block(source, 0, todo))] * cfg.num_hidden_layers
    else:
        # Wanda and cuts ranked by weights alone give the calibrated shapes and bytes; layers a raw
        # source would drop are unknown before calibration, so counted (an upper bound)
        layers = [0 if i in dropped else module_bytes(build_block(source, i, todo))
                  for i in range(cfg.num_hidden_layers)]
    norm = source.tensor("model.norm.weight")
    table = table_bytes(source, comp.quant)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    attn = cfg.hidden_size * head_dim(cfg) * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    costs = ModelCosts(
        model=source.label, n_layers=cfg.num_hidden_layers, layer_bytes=tuple(layers),
        embed_bytes=table, norm_bytes=norm.nbytes, head_bytes=table,
        tied=bool(cfg.tie_word_embeddings), kv_bytes_per_token_layer=kv_bytes_per_token_layer(cfg),
        head_compute=cfg.vocab_size * cfg.hidden_size / (mlp + attn), hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim(cfg), vocab=cfg.vocab_size, source_layer_bytes=4 * (mlp + attn))
    if use_cache and cache is not None:
        (cache / key).write_text(json.dumps(asdict(costs)))
    return costs


def table_bytes(source, quant: str, rows: tuple[int, int] = (512, 1024)) -> int:
    """Bytes of the embedding / lm_head table as `quant`'s method stores it, measured on two row
    counts and extended to the vocabulary: a table's bytes are affine in its rows (codes and
    scales per row, a few vectors per table), and the whole table is never read in fp32."""
    n = source.config.vocab_size
    if n <= rows[1]:
        return module_bytes(head_table(source.rows("model.embed_tokens.weight", 0, n), quant))
    a, b = (module_bytes(head_table(source.rows("model.embed_tokens.weight", 0, r), quant)) for r in rows)
    return a + (n - rows[0]) * (b - a) // (rows[1] - rows[0])


def ladder_bytes(source, specs: tuple[str, ...], layer: int = 0) -> dict[str, int]:
    """{spec: resident bytes of decoder layer `layer` at that spec}, measured on this model (the
    controller orders its compression ladder by them; every layer of a model has one shape).
    Cached beside the source's metadata: a restart reads them instead of building the layer."""
    cache, out = getattr(source, "cache", None), {}
    for spec in specs:
        comp, todo = remaining(source, spec)
        path = None if cache is None else cache / f"layer-bytes-v2-{layer}-{comp.spec}.json"
        if path is not None and path.is_file():
            out[spec] = json.loads(path.read_text())
            continue
        out[spec] = module_bytes(build_block(source, layer, todo))
        if path is not None:
            path.write_text(json.dumps(out[spec]))
    return out
