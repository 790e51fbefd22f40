"""Planner: contiguous layer ranges that fit each worker's budget, balanced by compute.

Pure functions over `ModelCosts` (measured by shards/plan/memory.py). Deterministic: the same costs
and budgets give the same plan.
"""
from __future__ import annotations

from shards.errors import PlanError, RangeError
from shards.plan.footprint import Overheads, footprint, workspace_bytes
from shards.plan.layer_range import LayerRange
from shards.plan.memory import ModelCosts
from shards.plan.plan import MiB, Plan, ShardSpec

DEFAULT_KV_TOKENS = 8192       # KV reserved per shard when no budget is given
MIN_KV_TOKENS = 512            # a budgeted shard must hold at least this many tokens of KV


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
         kv_tokens: int = DEFAULT_KV_TOKENS, compression: str = "fp32", device: str = "cpu",
         overheads: Overheads = Overheads()) -> Plan:
    """Split costs.n_layers into n_shards contiguous ranges.

    Without budgets every shard reserves `kv_tokens` of KV. With budgets (bytes per shard that
    it holds beside its runtime: Footprint.held), a shard's KV pool is what its budget leaves
    after weights, compiled graphs and workspace, at least MIN_KV_TOKENS.
    """
    n = costs.n_layers
    if n_shards < 1:
        raise RangeError(f"need at least one shard, got {n_shards}")
    if n_shards > n:
        raise RangeError(f"{n_shards} shards for {n} layers: each shard needs at least one layer")
    if budgets is not None and len(budgets) != n_shards:
        raise PlanError(f"{len(budgets)} budgets given for {n_shards} shards")
    caps = [n] * n_shards if budgets is None else _layer_caps(costs, budgets, overheads)
    if sum(caps) < n or min(caps) < 1:
        _raise_no_fit(costs, n_shards, budgets, compression, overheads)
    counts = _compute_counts(costs, n_shards, caps)
    specs, start = [], 0
    for k, c in enumerate(counts):
        r = LayerRange(start, start + c)
        specs.append(shard_spec(costs, k, r, budgets, kv_tokens, compression, device, overheads))
        start += c
    return Plan(costs.model, n, tuple(specs))


def position(k: int, n_shards: int, n_layers: int) -> LayerRange:
    """A one-layer range with shard k's ends: first and last decide embedding, head and workspace."""
    if n_shards == 1:
        return LayerRange(0, n_layers)
    return LayerRange(0, 1) if k == 0 else LayerRange(n_layers - 1, n_layers) if k == n_shards - 1 \
        else LayerRange(1, 2)


def fixed_bytes(costs: ModelCosts, k: int, n_shards: int, ov: Overheads) -> int:
    """What shard k holds beside its runtime before its first layer: embedding and head at the
    ends, inductor's runtime, the workspace."""
    r = position(k, n_shards, costs.n_layers)
    total = ov.compiled_bytes + workspace_bytes(costs, r, ov) + (costs.embed_bytes if k == 0 else 0)
    if k == n_shards - 1:
        total += costs.norm_bytes + (0 if (costs.tied and k == 0) else costs.head_bytes)
    return total


def _layer_caps(costs: ModelCosts, budgets: list[int], ov: Overheads) -> list[int]:
    """Most layers each shard could hold (its position decides embedding/head)."""
    n = costs.n_layers
    per_layer = max(costs.layer_bytes) + ov.compiled_layer_bytes + MIN_KV_TOKENS * costs.kv_bytes_per_token_layer
    return [max(0, min(n, (b - fixed_bytes(costs, k, len(budgets), ov)) // per_layer))
            for k, b in enumerate(budgets)]


def shard_spec(costs: ModelCosts, k: int, r: LayerRange, budgets: list[int] | None, kv_tokens: int,
               compression: str, device: str, ov: Overheads) -> ShardSpec:
    """Shard k of layers r with its planned footprint; its KV pool from its budget when given."""
    weights = shard_weight_bytes(costs, r)
    per_token = costs.kv_bytes_per_token_layer * len(r)
    rest = footprint(costs, r, weights, 0, ov)      # everything but the KV pool
    if budgets is None:
        kv_bytes, budget = kv_tokens * per_token, None
    else:
        budget = budgets[k]
        kv_bytes = budget - rest.held
        if kv_bytes < MIN_KV_TOKENS * per_token:
            need = rest.held + MIN_KV_TOKENS * per_token
            raise PlanError(f"shard {k} needs {need / MiB:.0f} MiB for layers {r} at {compression} "
                            f"(weights {weights / MiB:.0f} MiB, KV for {MIN_KV_TOKENS} tokens, compiled graphs "
                            f"{rest.compiled / MiB:.0f} MiB, workspace {rest.workspace / MiB:.0f} MiB), "
                            f"worker has {budget / MiB:.0f} MiB besides its runtime")
    return ShardSpec(k, r, compression, device, None, weights, kv_bytes, kv_bytes // per_token, budget,
                     runtime_bytes=rest.runtime, compiled_bytes=rest.compiled, workspace_bytes=rest.workspace,
                     transient_bytes=rest.transient)


def _raise_no_fit(costs: ModelCosts, n_shards: int, budgets: list[int], compression: str, ov: Overheads) -> None:
    """Name the first shard of an even split that does not fit, and the totals."""
    from shards.plan.layer_range import split_even
    ranges = split_even(costs.n_layers, n_shards)
    needs = [footprint(costs, r, shard_weight_bytes(costs, r), MIN_KV_TOKENS * costs.kv_bytes_per_token_layer * len(r),
                       ov).held for r in ranges]
    total_need = sum(needs)
    for k, (r, need) in enumerate(zip(ranges, needs)):
        if need > budgets[k]:
            raise PlanError(
                f"shard {k} needs {need / MiB:.0f} MiB for layers {r} at {compression}, worker has "
                f"{budgets[k] / MiB:.0f} MiB; the whole model needs at least {total_need / MiB:.0f} MiB "
                f"over {n_shards} shards, budgets give {sum(budgets) / MiB:.0f} MiB")
    raise PlanError(f"no contiguous split of {costs.n_layers} layers fits budgets "
                    f"{[round(b / MiB) for b in budgets]} MiB at {compression}")
