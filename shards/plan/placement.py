"""Placement: which node hosts each shard, and how many layers it gets (docs/cluster.md, "Placement").

Pure functions over `Node` (read from a running Ray cluster by serving/cluster.py) and
`ModelCosts`. Shards go to the nodes with the most memory, layers in proportion to the memory
each shard gets; shards on the same node are neighbours in the pipeline (one cross-node hop per
node). Deterministic: the same nodes and costs give the same plan.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shards.errors import PlanError
from shards.plan.footprint import Overheads
from shards.plan.memory import ModelCosts
from shards.plan.plan import MiB, Plan
from shards.plan.planner import fixed_bytes, plan, shard_spec


@dataclass(frozen=True)
class Node:
    """One Ray node as the planner sees it."""

    node_id: str          # Ray's hex node id (what NodeAffinitySchedulingStrategy takes)
    ip: str
    memory_bytes: int     # what shards may use there: Ray's `memory` resource, or `shardserve_bytes`
    cpus: float = 1.0
    gpus: float = 0.0


def assign_shards(nodes: list[Node], n_shards: int) -> list[Node]:
    """The node of each shard, in pipeline order: one shard on each of the biggest nodes
    first (more nodes, more memory), every further one where memory per shard stays most."""
    if not nodes:
        raise PlanError("no alive Ray node to place shards on")
    biggest = sorted(nodes, key=lambda n: (-n.memory_bytes, n.node_id))[:n_shards]
    count = {n.node_id: int(n in biggest) for n in nodes}
    for _ in range(n_shards - len(biggest)):
        best = max(nodes, key=lambda n: (n.memory_bytes / (count[n.node_id] + 1), n.node_id))
        count[best.node_id] += 1
    # pipeline order: bigger nodes first, a node's shards together
    order = sorted((n for n in nodes if count[n.node_id]), key=lambda n: (-n.memory_bytes, n.node_id))
    return [n for n in order for _ in range(count[n.node_id])]


def shard_capacities(nodes: list[Node], owners: list[Node], replicas: int = 1) -> list[int]:
    """Bytes each shard may use: its node's memory split among the node's shards of every replica."""
    per_node = {n.node_id: sum(o.node_id == n.node_id for o in owners) * replicas for n in nodes}
    return [o.memory_bytes // per_node[o.node_id] for o in owners]


def layer_counts(costs: ModelCosts, capacities: list[int], kv_tokens: int,
                 ov: Overheads = Overheads()) -> list[int]:
    """Layers per shard in proportion to the bytes each has left for layers (after its runtime,
    embedding, head, inductor's runtime and workspace: shards/plan/footprint.py), never more than
    fit with `kv_tokens` of KV each; at least one each."""
    n, k = costs.n_layers, len(capacities)
    per_layer = max(costs.layer_bytes) + ov.compiled_layer_bytes + kv_tokens * costs.kv_bytes_per_token_layer
    room = [max(0, c - ov.runtime_bytes - fixed_bytes(costs, i, k, ov)) for i, c in enumerate(capacities)]
    caps = [min(n, r // per_layer) for r in room]
    if min(caps) < 1 or sum(caps) < n:
        raise PlanError(
            f"{n} layers do not fit {k} shards with {[round(c / MiB) for c in capacities]} MiB: each layer needs "
            f"{per_layer / MiB:.1f} MiB (weights + KV for {kv_tokens} tokens), each shard {ov.runtime_bytes / MiB:.0f} "
            f"MiB of runtime besides, the shards hold at most "
            f"{caps} layers; add nodes, lower kv_tokens or compress more")
    ideal = [n * r / sum(room) for r in room]
    counts = [max(1, min(cap, int(x))) for x, cap in zip(ideal, caps)]
    while sum(counts) != n:   # largest remainder first, within each shard's cap
        up = sum(counts) < n
        cands = [i for i in range(k) if (counts[i] < caps[i] if up else counts[i] > 1)]
        i = max(cands, key=lambda j: (ideal[j] - counts[j]) * (1 if up else -1))
        counts[i] += 1 if up else -1
    return counts


def place(costs: ModelCosts, nodes: list[Node], n_shards: int, kv_tokens: int, compression: str = "fp32",
          replicas: int = 1, budgets: list[int] | None = None, overheads: Overheads = Overheads()) -> Plan:
    """A plan whose every shard names its node. With budgets, the budget planner decides the
    layers and nodes are only assigned; without, layers follow the shards' memory (equal
    memory: the compute-balanced split of shards/plan/planner.py). A node with
    one GPU per shard placed on it runs its shards on CUDA."""
    owners = assign_shards(nodes, n_shards)
    capacities = shard_capacities(nodes, owners, replicas)
    if budgets is not None:
        base = plan(costs, n_shards, budgets, kv_tokens, compression, overheads=overheads)
    else:
        counts = layer_counts(costs, capacities, kv_tokens, overheads)   # raises when the model does not fit
        # equal shares (one node, or equal nodes): balance compute instead, lm_head included
        base = plan(costs, n_shards, None, kv_tokens, compression, overheads=overheads) \
            if len(set(capacities)) == 1 else _plan_from_counts(costs, counts, kv_tokens, compression, overheads)
    on_node = {o.node_id: owners.count(o) * replicas for o in owners}
    return dataclasses.replace(base, shards=tuple(
        dataclasses.replace(s, node=o.node_id, device="cuda" if o.gpus >= on_node[o.node_id] else "cpu")
        for s, o in zip(base.shards, owners)))


def _plan_from_counts(costs: ModelCosts, counts: list[int], kv_tokens: int, compression: str,
                      ov: Overheads) -> Plan:
    from shards.plan.layer_range import LayerRange
    specs, start = [], 0
    for k, c in enumerate(counts):
        specs.append(shard_spec(costs, k, LayerRange(start, start + c), None, kv_tokens, compression, "cpu", ov))
        start += c
    return Plan(costs.model, costs.n_layers, tuple(specs))
