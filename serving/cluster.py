"""The running Ray cluster as the planner sees it: alive nodes, their memory, CPUs and GPUs."""
from __future__ import annotations

from shards.placement import Node

# A node may say how many bytes shards may use there (`ray start --resources='{"shardserve_bytes":
# 64e9}'`): on a GPU node that is the GPU's memory, which Ray's resources do not show.
CAPACITY_RESOURCE = "shardserve_bytes"


def cluster_nodes() -> list[Node]:
    """Alive nodes of the cluster this process is connected to (ray.init first), with the
    bytes each offers: `shardserve_bytes` when set, else Ray's `memory` resource (by default
    70% of the node's memory when Ray started)."""
    import ray
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append(Node(n["NodeID"], n.get("NodeManagerAddress", ""),
                          int(res.get(CAPACITY_RESOURCE) or res.get("memory", 0)),
                          float(res.get("CPU", 0)), float(res.get("GPU", 0))))
    return sorted(nodes, key=lambda x: x.node_id)
