"""Placement over synthetic nodes and costs (pure: no Ray, no torch model)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards import PlanError
from shards.plan.footprint import Overheads
from shards.plan.memory import ModelCosts
from shards.plan.placement import Node, assign_shards, layer_counts, place
from shards.plan.plan import MiB
from shards.plan.planner import plan

pytestmark = pytest.mark.unit

GiB = 1 << 30


def costs(n_layers=30, layer=14 * MiB, embed=108 * MiB):
    return ModelCosts("m", n_layers, (layer,) * n_layers, embed, 2304, embed, True, 1536, 8.0)


def node(name, gib, cpus=2, gpus=0):
    return Node(name, "10.0.0." + name[-1], int(gib * GiB), cpus, gpus)


def test_bigger_node_gets_more_layers_in_proportion():
    nodes = [node("a1", 1), node("b2", 3), node("c3", 2)]
    p = place(costs(), nodes, 3, kv_tokens=2048)
    assert [s.node for s in p.shards] == ["b2", "c3", "a1"]      # biggest first, then down
    lens = [len(s.layers) for s in p.shards]
    assert lens[0] > lens[1] > lens[2] and sum(lens) == 30
    # room after ends and workspace is ~3:2:1, so the split is close to 15:10:5
    assert all(abs(a - b) <= 2 for a, b in zip(lens, (15, 10, 5)))
    assert [s.device for s in p.shards] == ["cpu"] * 3


def test_equal_nodes_keep_the_compute_balanced_split():
    nodes = [node("a1", 4), node("b2", 4)]
    p = place(costs(), nodes, 2, kv_tokens=2048)
    assert p.ranges == plan(costs(), 2, None, 2048).ranges     # lm_head's compute counted
    assert {s.node for s in p.shards} == {"a1", "b2"}


def test_one_node_hosts_every_shard_in_a_row():
    p = place(costs(), [node("a1", 8)], 3, kv_tokens=2048)
    assert [s.node for s in p.shards] == ["a1"] * 3


def test_more_shards_than_nodes_go_where_memory_per_shard_is_most():
    owners = assign_shards([node("a1", 1), node("b2", 3)], 4)
    assert [o.node_id for o in owners] == ["b2", "b2", "b2", "a1"]   # 3/3 = 1 = 1/1: tie to the name


def test_replicas_share_each_node():
    nodes = [node("a1", 1), node("b2", 1)]
    one = place(costs(), nodes, 2, kv_tokens=2048, replicas=1)
    with pytest.raises(PlanError, match="do not fit"):   # half of 1 GiB each cannot hold 15 layers + KV
        place(costs(), nodes, 2, kv_tokens=16384, replicas=2)
    assert one.shards[0].node != one.shards[1].node


def test_gpu_node_runs_its_shards_on_cuda_when_it_has_one_each():
    nodes = [node("a1", 8, gpus=2), node("b2", 8, gpus=1)]
    p = place(costs(), nodes, 4, kv_tokens=2048)
    dev = {s.node: s.device for s in p.shards}
    assert dev == {"a1": "cuda", "b2": "cpu"}   # b2 hosts two shards with one GPU


def test_no_fit_names_the_numbers():
    with pytest.raises(PlanError, match=r"30 layers do not fit 2 shards with \[200, 200\] MiB"):
        place(costs(), [node("a1", 200 / 1024), node("b2", 200 / 1024)], 2, kv_tokens=2048)


def test_budgets_decide_layers_nodes_only_assigned():
    nodes = [node("a1", 1), node("b2", 3)]
    p = place(costs(), nodes, 2, kv_tokens=2048, budgets=[400 * MiB, 400 * MiB])
    assert p.ranges == plan(costs(), 2, [400 * MiB, 400 * MiB], 2048).ranges
    assert [s.node for s in p.shards] == ["b2", "a1"]


@settings(max_examples=200, deadline=None)
@given(mem=st.lists(st.integers(1, 64), min_size=1, max_size=6), data=st.data())
def test_counts_cover_every_layer_within_caps(mem, data):
    n_layers = data.draw(st.integers(len(mem), 48))
    c = costs(n_layers, layer=4 * MiB, embed=8 * MiB)
    caps_bytes = [m * 64 * MiB + 200 * MiB for m in mem]
    # 64 MiB a shard besides its layers and ends: runtime and inductor's (these costs name no
    # shape, so no activation workspace)
    ov = Overheads(runtime_bytes=40 * MiB, compiled_bytes=24 * MiB)
    try:
        counts = layer_counts(c, caps_bytes, kv_tokens=512, ov=ov)
    except PlanError:
        return
    assert sum(counts) == n_layers and min(counts) >= 1
    per_layer = 4 * MiB + 512 * 1536
    for k, (n, cap) in enumerate(zip(counts, caps_bytes)):
        # embedding first, norm + head last; the head is tied, so it is free when one shard holds both
        head = 0 if len(mem) == 1 else 8 * MiB
        ends = (8 * MiB if k == 0 else 0) + (head + 2304 if k == len(mem) - 1 else 0)
        assert n * per_layer <= cap - 64 * MiB - ends
    bigger = max(range(len(mem)), key=lambda k: (caps_bytes[k], -k))
    assert counts[bigger] >= min(counts)


def test_cluster_nodes_reads_memory_or_the_shardserve_bytes_opt_in(monkeypatch):
    import ray

    from serving.cluster import cluster_nodes

    def fake(*nodes):
        monkeypatch.setattr(ray, "nodes", lambda: [
            {"NodeID": i, "NodeManagerAddress": "10.0.0.1", "Alive": alive, "Resources": res}
            for i, alive, res in nodes])
    fake(("b", True, {"CPU": 4, "memory": 8e9}), ("a", True, {"CPU": 2, "GPU": 1, "memory": 2e9}),
         ("dead", False, {"memory": 64e9}))
    assert cluster_nodes() == [Node("a", "10.0.0.1", 2_000_000_000, 2, 1), Node("b", "10.0.0.1", 8_000_000_000, 4, 0)]
    fake(("head", True, {"CPU": 8, "memory": 32e9}), ("gpu", True, {"GPU": 1, "memory": 8e9, "shardserve_bytes": 20e9}))
    assert [(n.node_id, n.memory_bytes) for n in cluster_nodes()] == [("gpu", 20_000_000_000)]
