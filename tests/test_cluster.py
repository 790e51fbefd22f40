"""Tier 2: three Ray nodes on one host (ray.cluster_utils.Cluster) with different memory: the
plan follows the nodes' memory, every shard runs on its planned node, output stays exact."""
import subprocess
import sys
import time

import pytest

from serving.api.client import Client
from shards.model.step import SamplingParams
from tests.conftest import chat_ids
from tests.test_serve import QUESTION, free_port

pytestmark = pytest.mark.ray
GiB = 1 << 30
CONFIG = {"prefix": "clu-", "shards": 3, "kv_tokens": 2048, "compile": False, "compression": "fp32"}
NODE = dict(num_cpus=1, object_store_memory=128 << 20)


@pytest.fixture(scope="module")
def cluster():
    """Head 2 GiB, `big` 6 GiB, `small` 3 GiB of Ray `memory` resource (the planner's capacity)."""
    import ray
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, memory=2 * GiB, include_dashboard=False))
    nodes = {"head": c.head_node, "big": c.add_node(**NODE, memory=6 * GiB),
             "small": c.add_node(**NODE, memory=3 * GiB)}
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="shardserve", log_to_driver=False)
    yield c.address, {k: n.node_id for k, n in nodes.items()}
    from ray import serve

    from shards.runtime.actor import stop_pipeline
    serve.shutdown()
    stop_pipeline(CONFIG["prefix"])
    ray.shutdown()
    c.shutdown()


def test_plan_gives_the_bigger_node_more_layers(cluster):
    from serving.config import load
    from serving.launch import make_plan
    _, ids = cluster
    p = make_plan(load(CONFIG))
    layers = {s.node: len(s.layers) for s in p.shards}
    assert layers[ids["big"]] > layers[ids["small"]] > layers[ids["head"]], layers
    assert p.shards[0].node == ids["big"]


def test_plan_cli_shows_the_node_of_every_shard(cluster):
    address, ids = cluster
    out = subprocess.run([sys.executable, "-m", "serving.cli", "plan", "--shards", "3", "--kv-tokens", "2048",
                          "--address", address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r.split()[-1] for r in rows] == [ids[k][:12] for k in ("big", "small", "head")], out.stdout


def test_served_shards_run_on_their_planned_nodes_and_answer_exactly(cluster, source, tokenizer):
    from ray import serve

    from serving.api.app import ShardServe
    from serving.config import load
    from serving.launch import make_plan
    from shards.model.generator import Generator
    planned = [s.node for s in make_plan(load(CONFIG)).shards]
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(ShardServe.bind(CONFIG), name="shardserve", route_prefix="/", blocking=False)
    client = Client(f"http://127.0.0.1:{port}")
    deadline = time.time() + 300
    while not client.healthy():
        assert time.time() < deadline, "healthz never became 200"
        time.sleep(0.5)
    body = client.shards()
    assert [s["node_id"] for s in body["shards"]] == planned
    assert [s["node"] for s in body["plan"]["shards"]] == planned
    want = Generator(source, 1).generate([chat_ids(tokenizer, QUESTION[0]["content"])], SamplingParams(max_tokens=24))[0]
    assert client.chat(QUESTION, max_tokens=24, temperature=0) == tokenizer.decode(want, skip_special_tokens=True)
    print("layers per node:", {s["node_id"][:8]: s["end"] - s["start"] for s in body["shards"]})
