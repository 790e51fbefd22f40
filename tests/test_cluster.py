"""Tier 2: three Ray nodes on one host (ray.cluster_utils.Cluster) with different memory: the
plan follows the nodes' memory, every shard runs on its planned node, output stays exact, and
a node lost under load has its shard re-placed on a survivor with every request completing."""
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.api.client import Client
from serving.ingress import free_port
from shards.model.step import SamplingParams
from tests.conftest import chat_ids, prompts
from tests.test_serve import QUESTION

pytestmark = pytest.mark.ray
GiB = 1 << 30
CONFIG = {"prefix": "clu-", "shards": 3, "kv_tokens": 2048, "compile": False, "compression": "fp32"}
NODE = dict(num_cpus=1, object_store_memory=128 << 20)


@pytest.fixture(scope="module")
def cluster():
    """Head 2 GiB, `big` 6 GiB, `small` 3 GiB of Ray `memory` resource (the planner's capacity)."""
    import ray
    from ray.cluster_utils import Cluster
    # `head` resource: the Serve replica stays on the head, so removing a worker node takes
    # shards only (a replica's death is tests/test_chaos.py's)
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, memory=2 * GiB, include_dashboard=False,
                                                          resources={"head": 1}))
    nodes = {"head": c.head_node, "big": c.add_node(**NODE, memory=6 * GiB),
             "small": c.add_node(**NODE, memory=3 * GiB)}
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="shardserve", log_to_driver=False)
    yield c.address, {k: n.node_id for k, n in nodes.items()}, c, nodes
    from ray import serve

    from shards.runtime.actor import stop_pipeline
    serve.shutdown()
    stop_pipeline(CONFIG["prefix"])
    ray.shutdown()
    c.shutdown()


def test_plan_gives_the_bigger_node_more_layers(cluster):
    from serving.config import load
    from serving.launch import make_plan
    _, ids, *_ = cluster
    p = make_plan(load(CONFIG))
    layers = {s.node: len(s.layers) for s in p.shards}
    assert layers[ids["big"]] > layers[ids["small"]] > layers[ids["head"]], layers
    assert p.shards[0].node == ids["big"]


def test_plan_cli_shows_the_node_of_every_shard(cluster):
    address, ids, *_ = cluster
    out = subprocess.run([sys.executable, "-m", "serving.cli", "plan", "--shards", "3", "--kv-tokens", "2048",
                          "--address", address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r.split()[-1] for r in rows] == [ids[k][:12] for k in ("big", "small", "head")], out.stdout


@pytest.fixture(scope="module")
def served(cluster):
    """The app on the cluster, its replica on the head node; its client."""
    from ray import serve

    from serving.api.app import ShardServe
    port = free_port("127.0.0.1")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = ShardServe.options(ray_actor_options={"num_cpus": 0, "resources": {"head": 0.01}})
    serve.run(app.bind(CONFIG), name="shardserve", route_prefix="/", blocking=False)
    client = Client(f"http://127.0.0.1:{port}")
    deadline = time.time() + 300
    while not client.healthy():
        assert time.time() < deadline, "healthz never became 200"
        time.sleep(0.5)
    return client


def test_served_shards_run_on_their_planned_nodes_and_answer_exactly(cluster, served, source, tokenizer):
    from serving.config import load
    from serving.launch import make_plan
    from shards.model.generator import Generator
    planned = [s.node for s in make_plan(load(CONFIG)).shards]
    body = served.shards()
    assert [s["node_id"] for s in body["shards"]] == planned
    assert [s["node"] for s in body["plan"]["shards"]] == planned
    want = Generator(source, 1).generate([chat_ids(tokenizer, QUESTION[0]["content"])], SamplingParams(max_tokens=24))[0]
    assert served.chat(QUESTION, max_tokens=24, temperature=0) == tokenizer.decode(want, skip_special_tokens=True)
    print("layers per node:", {s["node_id"][:8]: s["end"] - s["start"] for s in body["shards"]})


def test_a_lost_node_has_its_shard_replaced_on_a_survivor_and_requests_complete(cluster, served):
    """`small` (shard 1's node) is removed while 6 greedy requests generate: shard 1 comes back
    on a surviving node and every request completes with the calm run's text."""
    _, ids, c, nodes = cluster
    asks = [[{"role": "user", "content": p}] for p in prompts(6)]

    def run_all():
        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(lambda m: served.chat(m, max_tokens=96, temperature=0), asks))
    calm = run_all()
    assert served.shards()["shards"][1]["node_id"] == ids["small"]
    with ThreadPoolExecutor(1) as bg:
        under_fault = bg.submit(run_all)
        steps = served.shards()["shards"][1]["steps"]
        deadline = time.time() + 60
        while served.shards()["shards"][1]["steps"] < steps + 8:   # generation under way on shard 1
            assert time.time() < deadline and not under_fault.done()
            time.sleep(0.05)
        t0 = time.time()
        c.remove_node(nodes["small"])
        assert under_fault.result(timeout=300) == calm
    body = served.shards()
    restarts = [e for e in body["events"] if e["action"] == "restart" and e["ok"]]
    assert restarts and restarts[-1]["shard"] == 1, body["events"]
    assert body["shards"][1]["node_id"] in (ids["head"], ids["big"])
    deadline = time.time() + 10       # frees ride on the next step or go out when the router idles
    while any(s["kv_blocks_used"] or s["live_sequences"] for s in served.shards()["shards"]):
        assert time.time() < deadline, served.shards()["shards"]
        time.sleep(0.1)
    print(f"node of shard 1 removed: re-placed on {body['shards'][1]['node_id'][:8]} in "
          f"{restarts[-1]['time'] + restarts[-1]['seconds'] - t0:.1f} s after the removal; 6 of 6 requests equal the calm run")
