"""What a shard process holds, part by part (docs/design.md, "Memory model"). Pure, no torch.

A shard's resident bytes are its weights and KV pool (ModelCosts, measured) plus:
- runtime: Python, torch, transformers and Ray's worker before any weight (bitsandbytes when a
  method needs it), measured by shards/runtime/probe.py on this machine;
- compiled: inductor's runtime with a graph loaded (measured there too), and each layer's
  decode graphs (COMPILED_LAYER_BYTES);
- workspace: the activations of the largest step the scheduler sends (a prefill chunk of
  `prefill_tokens`, a decode step of `max_batch` sequences), and on the last shard the logits
  and sampling temporaries of `max_batch` rows.
Loading holds one more transient: the layer being built, in fp32 (`transient`: one layer, more
for the methods whose quantizer copies a whole projection, registry.Method.load_layers).
"""
from __future__ import annotations

from dataclasses import dataclass

from shards.plan.layer_range import LayerRange
from shards.plan.memory import ModelCosts

MiB = 1 << 20
# one decoder layer's compiled decode graphs (its buckets alone and inside the whole-stage
# graph): RSS of compiled over eager shards less inductor's fixed part, 5.5-6.7 MiB a layer
# for SmolLM2-135M and Llama-3.2-1B shapes, 6-19 layers (docs/benchmarks.md, "plan-vs-rss")
COMPILED_LAYER_BYTES = 6 * MiB
DEQUANT_BYTES = 32 << 20   # a "block" method's fp32 weight copy in a step (shards/compress/quantize.py)
ACT_BYTES = 4          # activations are fp32 on every method (bf16 casts inside its matmuls)
LOGIT_COPIES = 3       # logits, their softmax, and top-p's sorted copy


@dataclass(frozen=True)
class Overheads:
    """A shard process's bytes besides weights and KV that do not depend on its layers'
    weights, and the step sizes its workspace is sized for. Zeros: not measured (a plan of
    weights and KV only)."""

    runtime_bytes: int = 0      # before any weight
    compiled_bytes: int = 0     # inductor's runtime with one graph loaded; 0 when compile is off
    compiled_layer_bytes: int = 0   # COMPILED_LAYER_BYTES when compile is on
    max_batch: int = 32         # sequences in a decode step
    prefill_tokens: int = 256   # tokens in a prefill chunk
    dequantizes: str = ""       # the method's fp32 weight copies in a step (registry.Method.dequantizes)
    load_layers: float = 1.0    # fp32 layers loading holds beside the finished ones (registry.Method)


@dataclass(frozen=True)
class Footprint:
    """One shard's planned bytes, part by part."""

    weights: int
    kv: int
    runtime: int
    compiled: int
    workspace: int
    transient: int

    @property
    def held(self) -> int:
        """What a budget bounds and the controller reads (RSS less the runtime)."""
        return self.weights + self.kv + self.compiled + self.workspace

    @property
    def total(self) -> int:
        """The process's resident bytes while serving at the configured step sizes."""
        return self.runtime + self.held

    @property
    def at_rest(self) -> int:
        """Resident bytes between steps (the step heap handed back)."""
        return self.total - self.workspace

    @property
    def load_peak(self) -> int:
        """The most the process holds while loading: at rest plus the layer being built."""
        return self.at_rest + self.transient


def per_token_activation_bytes(costs: ModelCosts) -> int:
    """Bytes one token's activations take inside a layer at once: the larger of the attention
    half (input, its norm, q|k|v, RoPE's two copies of q|k, the attention output) and the MLP
    half (input, its norm, gate|up, silu(gate), silu(gate) * up)."""
    h, i = costs.hidden, costs.intermediate
    q, kv = costs.heads * costs.head_dim, costs.kv_heads * costs.head_dim
    attention = 2 * h + (q + 2 * kv) + 2 * (q + kv) + q
    mlp = 2 * h + 4 * i
    return ACT_BYTES * max(attention, mlp)


def workspace_bytes(costs: ModelCosts, layers: LayerRange, ov: Overheads) -> int:
    """The largest step's temporaries: a prefill chunk (with its attention scores, heads x
    chunk x chunk) or a decode step, the embedding rows on the first shard, the logits and
    sampling copies on the last."""
    per_token = per_token_activation_bytes(costs)
    p, b = ov.prefill_tokens, ov.max_batch
    prefill = p * per_token + ACT_BYTES * costs.heads * p * p
    total = max(prefill, b * per_token) + dequantized_bytes(costs, ov.dequantizes)
    if layers.is_first():
        total += ACT_BYTES * p * costs.hidden
    if layers.is_last(costs.n_layers):
        total += ACT_BYTES * LOGIT_COPIES * b * costs.vocab
    return total


def dequantized_bytes(costs: ModelCosts, how: str) -> int:
    """The fp32 weight copy a step makes: the largest projection (gate|up, or q|k|v, or down), or
    DEQUANT_BYTES of it."""
    h, i = costs.hidden, costs.intermediate
    largest = ACT_BYTES * h * max(2 * i, (costs.heads + 2 * costs.kv_heads) * costs.head_dim)
    return {"": 0, "block": min(largest, DEQUANT_BYTES), "whole": largest}[how]


def footprint(costs: ModelCosts, layers: LayerRange, weights: int, kv: int, ov: Overheads) -> Footprint:
    """The shard of `layers` holding `weights` and a KV pool of `kv` bytes."""
    compiled = ov.compiled_bytes + ov.compiled_layer_bytes * len(layers)
    return Footprint(weights=weights, kv=kv, runtime=ov.runtime_bytes, compiled=compiled,
                     workspace=workspace_bytes(costs, layers, ov),
                     transient=int(ov.load_layers * costs.source_layer_bytes))
