"""Planner: contiguous layer ranges that fit each worker's budget, balanced by compute.

Pure functions over `ModelCosts` (measured by shards/plan/memory.py). Deterministic: the same costs
and budgets give the same plan.
"""
from __future__ import annotations

from shards.errors import PlanError, RangeError
from shards.plan.layer_range import LayerRange
from shards.plan.memory import ModelCosts
from shards.plan.plan import MiB, Plan, ShardSpec

DEFAULT_KV_TOKENS = 8192       # KV reserved per shard when no budget is given
MIN_KV_TOKENS = 512            # a budgeted shard must hold at least this many tokens of KV
WORKSPACE_BYTES = 64 * MiB     # activations and allocator slack per shard


def shard_weight_bytes(costs: ModelCosts, r: LayerRange) -> int:
    """Weights of a shard: its layers, plus embedding if first, plus norm + lm_head if last."""
    total = sum(costs.layer_bytes[r.start:r.end])
    if r.is_first():
        total += costs.embed_bytes
    if r.is_last(costs.n_layers):
        # a tied lm_head shares the embedding only when the same shard holds both
        total += costs.norm_bytes + (0 if (costs.tied and r.is_first()) else costs.head_bytes)
    return total


def _compute_counts(costs: ModelCosts, n_shards: int, caps: list[int]) -> list[int]:
    """Water-fill layers onto shards: each next layer goes to the shard with the least compute
    so far (lm_head counted on the last shard) among those under their layer cap."""
    # every shard needs one layer to be a contiguous range; the rest go where compute is least
    counts = [1] * n_shards
    load = [1.0] * n_shards
    load[-1] += costs.head_compute
    for _ in range(costs.n_layers - n_shards):
        open_ = [k for k in range(n_shards) if counts[k] < caps[k]]
        k = min(open_, key=lambda j: (load[j] + 1.0, j))
        counts[k] += 1
        load[k] += 1.0
    return counts


def plan(costs: ModelCosts, n_shards: int, budgets: list[int] | None = None,
         kv_tokens: int = DEFAULT_KV_TOKENS, compression: str = "fp32", device: str = "cpu") -> Plan:
    """Split costs.n_layers into n_shards contiguous ranges.

    Without budgets every shard reserves `kv_tokens` of KV. With budgets (bytes per shard), a
    shard's KV pool is what its budget leaves after weights and workspace, at least MIN_KV_TOKENS.
    """
    n = costs.n_layers
    if n_shards < 1:
        raise RangeError(f"need at least one shard, got {n_shards}")
    if n_shards > n:
        raise RangeError(f"{n_shards} shards for {n} layers: each shard needs at least one layer")
    if budgets is not None and len(budgets) != n_shards:
        raise PlanError(f"{len(budgets)} budgets given for {n_shards} shards")
    caps = [n] * n_shards if budgets is None else _layer_caps(costs, budgets)
    if sum(caps) < n or min(caps) < 1:
        _raise_no_fit(costs, n_shards, budgets, compression)
    counts = _compute_counts(costs, n_shards, caps)
    specs, start = [], 0
    for k, c in enumerate(counts):
        r = LayerRange(start, start + c)
        specs.append(_spec(costs, k, r, budgets, kv_tokens, compression, device))
        start += c
    return Plan(costs.model, n, tuple(specs))


def _layer_caps(costs: ModelCosts, budgets: list[int]) -> list[int]:
    """Most layers each shard could hold (its position decides embedding/head)."""
    n, caps = costs.n_layers, []
    per_layer = max(costs.layer_bytes) + MIN_KV_TOKENS * costs.kv_bytes_per_token_layer
    for k, b in enumerate(budgets):
        fixed = WORKSPACE_BYTES + (costs.embed_bytes if k == 0 else 0)
        if k == len(budgets) - 1:
            fixed += costs.norm_bytes + (0 if (costs.tied and k == 0) else costs.head_bytes)
        caps.append(max(0, min(n, (b - fixed) // per_layer)))
    return caps


def _spec(costs, k, r, budgets, kv_tokens, compression, device) -> ShardSpec:
    weights = shard_weight_bytes(costs, r)
    per_token = costs.kv_bytes_per_token_layer * len(r)
    if budgets is None:
        kv_bytes, budget = kv_tokens * per_token, None
    else:
        budget = budgets[k]
        kv_bytes = budget - weights - WORKSPACE_BYTES
        if kv_bytes < MIN_KV_TOKENS * per_token:
            need = weights + WORKSPACE_BYTES + MIN_KV_TOKENS * per_token
            raise PlanError(f"shard {k} needs {need / MiB:.0f} MiB for layers {r} at {compression} "
                            f"(weights {weights / MiB:.0f} MiB, KV for {MIN_KV_TOKENS} tokens, "
                            f"workspace {WORKSPACE_BYTES / MiB:.0f} MiB), worker has {budget / MiB:.0f} MiB")
    return ShardSpec(k, r, compression, device, None, weights, kv_bytes, kv_bytes // per_token, budget)


def _raise_no_fit(costs: ModelCosts, n_shards: int, budgets: list[int], compression: str) -> None:
    """Name the first shard of an even split that does not fit, and the totals."""
    from shards.plan.layer_range import split_even
    total_need = shard_weight_bytes(costs, LayerRange(0, costs.n_layers)) + n_shards * WORKSPACE_BYTES
    for k, r in enumerate(split_even(costs.n_layers, n_shards)):
        per_token = costs.kv_bytes_per_token_layer * len(r)
        need = shard_weight_bytes(costs, r) + WORKSPACE_BYTES + MIN_KV_TOKENS * per_token
        if need > budgets[k]:
            raise PlanError(
                f"shard {k} needs {need / MiB:.0f} MiB for layers {r} at {compression}, worker has "
                f"{budgets[k] / MiB:.0f} MiB; the whole model needs at least {total_need / MiB:.0f} MiB "
                f"over {n_shards} shards, budgets give {sum(budgets) / MiB:.0f} MiB")
    raise PlanError(f"no contiguous split of {costs.n_layers} layers fits budgets "
                    f"{[round(b / MiB) for b in budgets]} MiB at {compression}")
