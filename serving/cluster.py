"""The running Ray cluster as the planner sees it: alive nodes, their memory, CPUs and GPUs."""
from __future__ import annotations

from shards.plan.placement import Node

# A node may say how many bytes shards may use there (`ray start --resources='{"shardserve_bytes":
# 64e9}'`): on a GPU node that is the GPU's memory, which Ray's resources do not show. Once any
# node says it, only the nodes that say it host shards (a head that only routes says nothing).
CAPACITY_RESOURCE = "shardserve_bytes"


def cluster_nodes() -> list[Node]:
    """Alive nodes of the cluster this process is connected to (ray.init first) that may host
    shards, with the bytes each offers: `shardserve_bytes` when nodes set it, else Ray's
    `memory` resource (by default 70% of the node's memory when Ray started)."""
    import ray
    alive = [n for n in ray.nodes() if n.get("Alive")]
    key = CAPACITY_RESOURCE if any(CAPACITY_RESOURCE in n.get("Resources", {}) for n in alive) else "memory"
    nodes = [Node(n["NodeID"], n.get("NodeManagerAddress", ""), int(n["Resources"][key]),
                  float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
             for n in alive if key in n.get("Resources", {})]
    return sorted(nodes, key=lambda x: x.node_id)
