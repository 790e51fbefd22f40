"""Tier 2: the Serve app over real HTTP on loopback (openai SDK, httpx client, handle)."""
import socket
import time

import httpx
import pytest

from serving.client import Client, HandleClient, ShardServeError
from shards.step import SamplingParams
from tests.conftest import chat_ids

pytestmark = pytest.mark.ray
CONFIG = {"prefix": "srv-", "shards": 2, "kv_tokens": 4096}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(config: dict, url: str) -> None:
    from ray import serve

    from serving.app import ShardServe
    serve.run(ShardServe.bind(config), name="shardserve", route_prefix="/", blocking=False)
    deadline = time.time() + 300
    while not Client(url).healthy():
        assert time.time() < deadline, "healthz never became 200"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def url():
    import ray
    from ray import serve

    from serving.launch import EngineConfig, start
    ray.init(namespace="shardserve", include_dashboard=False, log_to_driver=False)
    # shards owned by this process (as the CLI does), so redeploying the app keeps them
    _, handles, _ = start(EngineConfig(**CONFIG))
    ray.get([h.ready.remote() for h in handles])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    deploy(CONFIG, base)
    yield base
    from shards.actor import stop_pipeline
    serve.shutdown()
    stop_pipeline(CONFIG["prefix"])
    ray.shutdown()


def test_openai_sdk_chat_equals_reference_generator(url, source, tokenizer):
    from openai import OpenAI

    from shards.generator import Generator
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    r = sdk.chat.completions.create(model="shardserve-default", messages=QUESTION, max_tokens=24, temperature=0)
    want = Generator(source, 1).generate([chat_ids(tokenizer, QUESTION[0]["content"])], SamplingParams(max_tokens=24))[0]
    assert r.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    assert r.choices[0].message.content.strip() == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(want)


def test_openai_sdk_streaming(url):
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    chunks = list(sdk.chat.completions.create(model="m", messages=QUESTION, max_tokens=24, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == "The capital of France is Paris."
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "stop"
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      json={"messages": QUESTION, "max_tokens": 8, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_completions_models_shards(url):
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    r = sdk.completions.create(model="m", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in r.choices[0].text and r.usage.prompt_tokens > 0
    assert [m.id for m in sdk.models.list().data] == ["shardserve-default"]
    shards = Client(url).shards()["shards"]
    assert [(s["start"], s["end"]) for s in shards] == [(0, 19), (19, 30)]
    assert all(s["rss_bytes"] > s["weight_bytes"] > 100 * 2**20 and s["kv_bytes_reserved"] > 0 for s in shards)


def test_python_client_and_stop_strings(url):
    c = Client(url)
    assert c.chat(QUESTION, max_tokens=24, temperature=0).strip() == "The capital of France is Paris."
    assert "".join(c.chat(QUESTION, stream=True, max_tokens=24, temperature=0)).strip() == "The capital of France is Paris."
    r = c.chat_response(QUESTION, max_tokens=24, temperature=0, stop=["France"])
    assert r["choices"][0]["message"]["content"] == "The capital of " and r["choices"][0]["finish_reason"] == "stop"
    assert "".join(c.complete("The capital of France is", stream=True, max_tokens=5, temperature=0)).strip().startswith("Paris")


def test_handle_client(url):
    from ray import serve
    h = serve.get_app_handle("shardserve")
    assert HandleClient(h).chat(QUESTION, max_tokens=24, temperature=0).strip() == "The capital of France is Paris."


def test_errors_use_openai_body(url):
    c = Client(url)
    with pytest.raises(ShardServeError) as e:
        c.chat(QUESTION, temperature=5)
    assert e.value.status == 400 and e.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in e.value.body["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x " * 5000, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and "KV blocks" in r.json()["error"]["message"]


def test_api_key(url):
    """Redeploy with a key: every endpoint but /healthz needs it."""
    deploy({**CONFIG, "api_key": "s3cret"}, url)
    try:
        assert httpx.get(url + "/healthz").status_code == 200
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION}).status_code == 401
        assert Client(url, api_key="s3cret").chat(QUESTION, max_tokens=24, temperature=0).strip() == \
            "The capital of France is Paris."
    finally:
        deploy(CONFIG, url)
    assert httpx.get(url + "/v1/models").status_code == 200


def test_bench_drives_the_endpoint_and_reads_shard_memory(url):
    """`shardserve bench`'s HTTP driver: 4 streamed requests, 2 in flight; token counts from
    usage, first-token and inter-token times inside each request's latency."""
    import asyncio

    from serving import bench
    from shards.data import read_prompts
    r = asyncio.run(bench.http_level(url, read_prompts(4), 2, max_tokens=8))
    assert r["requests"] == 4 and 4 <= r["completion_tokens"] <= 32 and r["tokens_per_s"] > 0
    assert 0 < r["ttft_p50_s"] <= r["p50_s"] <= r["p99_s"] <= r["wall_s"]
    assert r["itl_p50_ms"] is None or r["itl_p50_ms"] > 0
    mem = bench.shard_memory(url)
    assert [m["index"] for m in mem] == [0, 1]
    assert all(m["peak_rss_bytes"] >= m["rss_bytes"] > m["base_rss_bytes"] > 0 for m in mem)
    table = bench.table({"shardserve": [r], "hf_generate": [{**r, "tokens_per_s": r["tokens_per_s"] / 2}]})
    assert "| shardserve | 2 |" in table and "| 2.00 |" in table


def test_shard_budget_patch_and_events(url):
    """PATCH /v1/shards/{k} sets a budget the shard reports (large: no controller action here);
    /v1/shards carries the plan and the events list; bad index 404, bad body 400."""
    from serving.cli import main
    c = Client(url)
    st = c.set_budget(0, 8 * 2**30)
    assert st["budget_bytes"] == 8 * 2**30
    body = c.shards()
    assert body["shards"][0]["budget_bytes"] == 8 * 2**30 and body["plan"]["shards"][0]["budget_bytes"] == 8 * 2**30
    assert body["events"] == [] and body["down"] is None and body["shards"][1]["name"] == "srv-shard-1"
    assert main(["budget", "0", "none", "--url", url]) == 0
    assert c.shards()["shards"][0]["budget_bytes"] is None
    r = httpx.patch(url + "/v1/shards/7", json={"budget_bytes": 1})
    assert r.status_code == 404 and "shards 0..1" in r.json()["error"]["message"]
    r = httpx.patch(url + "/v1/shards/0", json={"budget": 1})
    assert r.status_code == 400 and "budget_bytes" in r.json()["error"]["message"]


def test_failing_shard_gives_503_and_a_final_sse_error_then_recovers(url):
    """Every step of shard 0 raises: the request ends with an OpenAI error (503 / an error
    chunk in the stream) after its retries, never hangs; then the service answers again."""
    import ray
    shard0 = ray.get_actor("srv-shard-0", namespace="shardserve")
    ray.get(shard0.inject_fault.remote(1000, "disk on fire"))
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8}, timeout=120)
        assert r.status_code == 503 and "disk on fire" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                          json={"messages": QUESTION, "max_tokens": 8, "stream": True}) as s:
            lines = [x for x in s.iter_lines() if x]
        assert '"error"' in lines[-2] and "disk on fire" in lines[-2] and lines[-1] == "data: [DONE]"
    finally:
        ray.get(shard0.inject_fault.remote(0))
    assert Client(url).chat(QUESTION, max_tokens=24, temperature=0).strip() == "The capital of France is Paris."
