"""Tier 2: the Serve app over real HTTP on loopback (openai SDK, httpx client, handle)."""
import json
import re
import time

import httpx
import pytest

from serving.api.client import Client, HandleClient, ShardServeError
from serving.config import load
from serving.launch import replica_prefixes
from shards.model.step import SamplingParams
from tests.conftest import chat_ids

pytestmark = pytest.mark.ray
CONFIG = {"prefix": "srv-", "shards": 2, "kv_tokens": 4096, "compile": True, "compression": "fp32"}   # the compiled decode path, end to end
PREFIX = replica_prefixes(load(CONFIG))[0]      # srv-<fingerprint>-: the app's actor names
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def deploy(config: dict, url: str) -> None:
    from ray import serve

    from serving.api.app import ShardServe
    serve.run(ShardServe.bind(config), name="shardserve", route_prefix="/", blocking=False)
    deadline = time.time() + 300
    while not Client(url).healthy():
        assert time.time() < deadline, "healthz never became 200"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def url():
    import ray
    from ray import serve

    from serving.ingress import choose, env, environment, free_port
    from serving.launch import start
    # as `shardserve serve` starts it: HTTP straight into the one replica, Serve's proxy aside
    ingress = choose(free_port("127.0.0.1"), replicas=1, starts_ray=True)
    with environment(env(ingress)):
        ray.init(namespace="shardserve", include_dashboard=False, log_to_driver=False)
    # shards owned by this process (as the CLI does), so redeploying the app keeps them
    _, handles, *_ = start(load(CONFIG, prefix=PREFIX))
    ray.get([h.ready.remote() for h in handles])
    serve.start(http_options={"host": "127.0.0.1", "port": ingress.proxy_port})
    base = f"http://127.0.0.1:{ingress.port}"
    deploy(CONFIG, base)
    yield base
    from shards.runtime.actor import stop_pipeline
    serve.shutdown()
    stop_pipeline(CONFIG["prefix"])
    ray.shutdown()


def test_the_replica_serves_the_port_and_the_proxy_only_its_own(url):
    """Direct ingress: the process listening on the users' port is the Serve replica (the router),
    not Serve's proxy, and the proxy's port answers too (with the same app behind it)."""
    import psutil
    port = int(url.rsplit(":", 1)[1])
    # on the served host only: every Ray worker also listens on all interfaces (its own RPC port)
    owner = {c.laddr.port: c.pid for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.ip == "127.0.0.1"}
    assert "ServeReplica" in " ".join(psutil.Process(owner[port]).cmdline())
    proxies = [p for p, pid in owner.items() if "ProxyActor" in " ".join(psutil.Process(pid).cmdline())]
    assert proxies and port not in proxies
    assert any(Client(f"http://127.0.0.1:{p}").healthy() for p in proxies)


def test_openai_sdk_chat_equals_reference_generator(url, source, tokenizer):
    from openai import OpenAI

    from shards.model.generator import Generator
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    r = sdk.chat.completions.create(model="shardserve-default", messages=QUESTION, max_tokens=24, temperature=0)
    want = Generator(source, 1).generate([chat_ids(tokenizer, QUESTION[0]["content"])], SamplingParams(max_tokens=24))[0]
    assert r.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    assert r.choices[0].message.content.strip() == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(want)


def test_openai_sdk_streaming(url):
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    chunks = list(sdk.chat.completions.create(model="shardserve-default", messages=QUESTION, max_tokens=24, temperature=0, stream=True))
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
    r = sdk.completions.create(model="shardserve-default", prompt="The capital of France is", max_tokens=5, temperature=0)
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


@pytest.mark.parametrize("content,headers,status,words", [
    (b"{not json", {}, 400, "invalid request body"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'.replace(b"\\xff\\xfe", b"\xff\xfe"), {}, 400,
     "invalid request body"),                                            # invalid UTF-8
    (b"[1, 2]", {}, 400, "JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {}, 400, "NaN"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}', {}, 404, "gpt-9"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', {}, 400, "tools"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [""]}', {}, 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "' + b"a" * (1 << 20) + b'"}]}', {}, 413, "limit"),
])
def test_bad_requests_get_4xx_bodies(url, content, headers, status, words):
    r = httpx.post(url + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json", **headers}, timeout=60)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_tiny_temperature_and_text_parts_answer(url):
    r = Client(url).chat_response([{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                                                {"type": "text", "text": "of France?"}]}],
                                  max_tokens=24, temperature=1e-45, seed=2**64 - 1)
    assert r["choices"][0]["message"]["content"].strip() == "The capital of France is Paris."


def test_template_error_is_a_400(url):
    """A tokenizer or template exception comes back as a 400 that says so, never a 500 or a 200:
    a lone surrogate (valid JSON, not encodable text) makes SmolLM2's tokenizer raise."""
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "x" * 10}], "max_tokens": 1})
    assert r.status_code == 200
    body = {"messages": [{"role": "user", "content": "\udcff"}], "max_tokens": 1}   # lone surrogate
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("could not tokenize the request"), r.text


def test_client_disconnect_frees_kv_on_every_shard(url):
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      json={"messages": QUESTION, "max_tokens": 400, "stream": True,
                            "stop": ["never-appears"]}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert all(x.startswith("data: ") or not x for x in got)
    deadline = time.time() + 20
    while True:
        shards = Client(url).shards()["shards"]
        if all(s["kv_blocks_used"] == 0 and s["live_sequences"] == 0 for s in shards):
            break
        assert time.time() < deadline, f"KV still held after the client left: {[s['kv_blocks_used'] for s in shards]}"
        time.sleep(0.2)


def test_api_key(url):
    """Redeploy with a key: every endpoint but /healthz needs it, the docs and schema too; with
    an admin key, /v1/shards needs that one."""
    deploy({**CONFIG, "api_key": "s3cret"}, url)
    try:
        assert httpx.get(url + "/healthz").status_code == 200
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION}).status_code == 401
        assert Client(url, api_key="s3cret").chat(QUESTION, max_tokens=24, temperature=0).strip() == \
            "The capital of France is Paris."
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}          # says ok, no internals
        # an admin key: /v1/shards and budget changes take it, and the API key no longer does
        deploy({**CONFIG, "api_key": "s3cret", "admin_key": "adm1n"}, url)
        assert httpx.get(url + "/v1/shards", headers={"Authorization": "Bearer s3cret"}).status_code == 401
        assert httpx.patch(url + "/v1/shards/0", json={"budget_bytes": None},
                           headers={"Authorization": "Bearer s3cret"}).status_code == 401
        assert Client(url, api_key="s3cret", admin_key="adm1n").shards()["shards"][0]["index"] == 0
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
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
    """PATCH /v1/shards/{k} (an index or the actor's name) sets a budget the shard reports
    (large: no controller action here); /v1/shards carries the plan and the events list; bad
    index or name 404, bad body 400."""
    from serving.cli import main
    c = Client(url)
    st = c.set_budget(0, 8 * 2**30)
    assert st.budget_bytes == 8 * 2**30
    body = c.shards()
    assert body["shards"][0]["budget_bytes"] == 8 * 2**30 and body["plan"]["shards"][0]["budget_bytes"] == 8 * 2**30
    assert body["events"] == [] and body["down"] is None and body["shards"][1]["name"] == f"{PREFIX}shard-1"
    assert main(["budget", "0", "none", "--url", url]) == 0
    assert c.shards()["shards"][0]["budget_bytes"] is None
    r = httpx.patch(url + "/v1/shards/0", json={"budget_bytes": 2**20})   # under its layers at the last ladder step
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "needs at least" in msg and "a budget of 1 MiB" in msg, msg
    assert c.shards()["shards"][0]["budget_bytes"] is None      # refused, so never set
    r = httpx.patch(url + "/v1/shards/7", json={"budget_bytes": 1})
    assert r.status_code == 404 and "shards 0..1" in r.json()["error"]["message"]
    assert c.set_budget(f"{PREFIX}shard-1", 8 * 2**30).budget_bytes == 8 * 2**30     # by its stable name
    assert c.shards()["plan"]["shards"][1]["budget_bytes"] == 8 * 2**30
    assert c.set_budget(f"{PREFIX}shard-1", None).budget_bytes is None
    r = httpx.patch(url + f"/v1/shards/{PREFIX}shard-9", json={"budget_bytes": 1})
    assert r.status_code == 404 and f"{PREFIX}shard-0, {PREFIX}shard-1" in r.json()["error"]["message"]
    r = httpx.patch(url + "/v1/shards/0", json={"budget": 1})
    assert r.status_code == 400 and "budget_bytes" in r.json()["error"]["message"]


def test_tokenize_detokenize_and_stream_usage(url, tokenizer):
    """vLLM's /tokenize and /detokenize, and OpenAI's stream_options.include_usage through the SDK."""
    from openai import OpenAI
    text = "The capital of France"
    r = httpx.post(url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 4096
    assert r["token_strs"] == tokenizer.convert_ids_to_tokens(r["tokens"])
    chat = httpx.post(url + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["tokens"] == chat_ids(tokenizer, QUESTION[0]["content"])       # what the chat endpoint feeds
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "outside the vocabulary of 49152" in bad.json()["error"]["message"]
    assert httpx.post(url + "/tokenize", json={"prompt": "a", "messages": QUESTION}).status_code == 400
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    chunks = list(sdk.chat.completions.create(model="shardserve-default", messages=QUESTION, max_tokens=24,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    u = chunks[-1].usage
    assert u.prompt_tokens == chat["count"] and 0 < u.completion_tokens <= 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]).strip() == "The capital of France is Paris."


def test_stop_pipeline_spares_the_served_fingerprint(url):
    """What a new deployment reclaims: its prefix's actors under other fingerprints (a
    replaced deployment's), never its own, another prefix's, or names without one."""
    import ray

    from shards.runtime.actor import stop_pipeline

    @ray.remote(num_cpus=0)
    class Named:
        def ping(self):
            return 1
    stale = ["srv-0123abcd-shard-0", "srv-0123abcd-r1-controller"]
    spared = ["srv-shard-7", "srvx-0123abcd-shard-0", "srv-0123abcd-shard-0x"]
    for name in stale + spared:
        Named.options(name=name, namespace="shardserve", lifetime="detached").remote()
    try:
        assert sorted(stop_pipeline("srv-", keep=load(CONFIG).fingerprint())) == sorted(stale)
        assert [s["name"] for s in Client(url).shards()["shards"]] == [f"{PREFIX}shard-0", f"{PREFIX}shard-1"]
        assert all(ray.get(ray.get_actor(n, namespace="shardserve").ping.remote()) == 1 for n in spared)
    finally:
        for name in spared:
            ray.kill(ray.get_actor(name, namespace="shardserve"))
    assert Client(url).chat(QUESTION, max_tokens=24, temperature=0).strip() == "The capital of France is Paris."


def test_failing_shard_gives_503_and_a_final_sse_error_then_recovers(url):
    """Every step of shard 0 raises: the request ends with an OpenAI error (503 / an error
    chunk in the stream) after its retries, never hangs; then the service answers again."""
    import ray
    shard0 = ray.get_actor(f"{PREFIX}shard-0", namespace="shardserve")
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


def test_full_queue_429_and_timeout_504(url):
    """Redeploys: max_waiting 0 refuses every request with 429 + Retry-After; a 10 ms timeout
    (shorter than any first token here) ends a request with 504, streamed or not, and frees its KV."""
    try:
        deploy({**CONFIG, "max_waiting": 0}, url)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        deploy({**CONFIG, "timeout_s": 0.01}, url)
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "stream": stream}, timeout=60)
            assert r.status_code == 504 and "0.01 s timeout" in r.json()["error"]["message"]
    finally:
        deploy(CONFIG, url)
    deadline = time.time() + 30       # the aborted requests' frees ride on the next step or go alone
    while any(s["kv_blocks_used"] for s in Client(url).shards()["shards"]):
        assert time.time() < deadline, "KV still held after the timed-out requests"
        time.sleep(0.2)


def test_fuzz_the_http_api(url):
    """500 generated requests (hypothesis: random types, ranges, extra fields, raw bytes): never
    a 5xx, never a hang (60 s client timeout), and a normal request answers afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                       st.text(max_size=20))
    content = st.one_of(st.text(max_size=40), scalar,
                        st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]),
                                                        "text": st.text(max_size=20)}), max_size=3))
    message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), scalar),
                                     "content": content})
    mutations = {"messages": st.one_of(st.lists(message, max_size=3), scalar),
                 # invalid or tiny: a valid max_tokens of thousands is a long request, not a hang
                 "max_tokens": st.one_of(st.integers(-3, 3), st.integers(4097, 2**40), st.integers(-2**70, -4),
                                         st.none(), st.booleans(), st.text("abc xyz", max_size=20),
                                         st.floats(allow_nan=False).filter(lambda f: not 3 < f < 4097)),
                 "temperature": st.one_of(st.floats(-1, 3), scalar), "top_p": st.one_of(st.floats(-1, 2), scalar),
                 "top_k": st.one_of(st.integers(-5, 10**7), scalar), "seed": st.one_of(st.integers(-2**65, 2**65), scalar),
                 "stop": st.one_of(st.lists(st.text(max_size=5), max_size=6), scalar), "stream": st.booleans(),
                 "n": st.integers(-1, 3), "logprobs": st.booleans(), "model": st.sampled_from(["shardserve-default", "x"]),
                 "prompt": st.one_of(st.text(max_size=40), scalar), "extra": scalar}
    # a valid request (tiny max_tokens, so valid ones finish fast) with 0-3 fields replaced by
    # values of any type or range, or extra fields; one in ten is random bytes

    @st.composite
    def request(draw):
        chat = draw(st.booleans())
        body = {"max_tokens": draw(st.integers(1, 3)), "temperature": draw(st.floats(0, 2))}
        if chat:
            body["messages"] = [{"role": "user", "content": draw(st.text(min_size=1, max_size=40))}]
        else:
            body["prompt"] = draw(st.text(min_size=1, max_size=40))
        for k in draw(st.lists(st.sampled_from(sorted(mutations)), max_size=3, unique=True)):
            body[k] = draw(mutations[k])
        raw = draw(st.binary(max_size=64)) if draw(st.integers(0, 9)) == 0 else json.dumps(body).encode()
        return ("/v1/chat/completions" if chat else "/v1/completions"), raw

    statuses = {}

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request())
    def one(path_content):
        path, content = path_content
        r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (content[:300], r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert "message" in r.json()["error"]

    one()
    print(f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 500 and statuses.get(200, 0) >= 50
    assert Client(url).chat(QUESTION, max_tokens=24, temperature=0).strip() == "The capital of France is Paris."


def test_shards_report_where_decode_time_goes(url):
    """/v1/shards?since=T splits the decode steps that ended after T: the router's launch-to-
    tokens median, each shard's own median step, and the rest (Ray hops, router)."""
    import time as _time
    c = Client(url)
    since = _time.time()
    c.chat(QUESTION, max_tokens=16, temperature=0)
    t = httpx.get(url + "/v1/shards", params={"since": since}, timeout=30).json()["timing"]
    assert t["decode_groups"] >= 5   # the answer is 8 tokens
    # every hop holds each shard's step, so each shard's median is under the hop's median; the
    # sum of medians is not the median of sums (CI once saw 45.6 + 39.4 > 83.0 on a loaded VM)
    assert all(0 < x < t["decode_hop_ms_p50"] for x in t["shard_decode_ms_p50"])
    assert abs(t["ray_router_ms"] - (t["decode_hop_ms_p50"] - sum(t["shard_decode_ms_p50"]))) < 1e-6
    later = httpx.get(url + "/v1/shards", params={"since": _time.time() + 60}, timeout=30).json()["timing"]
    assert later["decode_groups"] == 0 and later["decode_hop_ms_p50"] is None


def _hf_logprobs(hf_model, ids: list[int]):
    """transformers' log_softmax over the vocabulary at every position of ids: [len(ids), vocab]."""
    import torch
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)


def test_echo_scores_the_prompt_as_transformers_does(url, tokenizer, hf_model):
    """/v1/completions with echo and max_tokens 0 (what evaluation harnesses send): each prompt
    token's log probability and top alternatives equal transformers' to 1e-3; the prompt may be
    text, token ids, or a list of either (one choice each)."""
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = tokenizer.encode(text)
    ref = _hf_logprobs(hf_model, ids)
    for prompt in (text, [text, text], ids, [ids]):
        n = len(prompt) if isinstance(prompt[0], (str, list)) and not isinstance(prompt, str) else 1
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True,
                                                       "logprobs": 2, "temperature": 0}, timeout=120).json()
        assert [c["index"] for c in r["choices"]] == list(range(n)), r
        assert r["usage"] == {"prompt_tokens": n * len(ids), "completion_tokens": 0, "total_tokens": n * len(ids)}
    for c in r["choices"]:
        lp = c["logprobs"]
        assert c["text"] == text and c["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want)) < 1e-3
        top = ref[len(ids) - 2].topk(2)
        assert list(lp["top_logprobs"][-1].values()) == pytest.approx(top.values.tolist(), abs=1e-3)
        assert list(lp["top_logprobs"][-1]) == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]


def test_generated_logprobs_chat_and_completions_streamed_and_not(url, tokenizer, hf_model):
    """Greedy: the sampled token is the most likely, its logprob transformers' at that step;
    top_logprobs alternatives come sorted; streamed chunks carry the same numbers."""
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    kw = dict(model="shardserve-default", messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    r = sdk.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    ids = chat_ids(tokenizer, QUESTION[0]["content"])
    gen = tokenizer.encode(r.choices[0].message.content)
    ref = _hf_logprobs(hf_model, ids + gen)
    # every generated token has its entry, the end-of-turn token too (it counts in usage)
    assert len(content) == r.usage.completion_tokens and content[-1].token == "<|im_end|>"
    assert "".join(c.token for c in content[:-1]) == r.choices[0].message.content
    for i, c in enumerate(content[:len(gen)]):
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert abs(c.logprob - float(ref[len(ids) - 1 + i].max())) < 1e-3
    streamed = [x for ch in sdk.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert [(x.token, round(x.logprob, 4)) for x in streamed] == [(x.token, round(x.logprob, 4)) for x in content]
    comp = sdk.completions.create(model="shardserve-default", prompt="The capital of France is", max_tokens=4,
                                  temperature=0, logprobs=1)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and lp.token_logprobs[0] == max(lp.top_logprobs[0].values())
    bad = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "top_logprobs": 2})
    assert bad.status_code == 400 and "top_logprobs needs logprobs" in bad.json()["error"]["message"]
    bad = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 0})
    assert bad.status_code == 400 and "max_tokens 0 needs echo" in bad.json()["error"]["message"]
    bad = httpx.post(url + "/v1/completions", json={"prompt": [10**9], "max_tokens": 1})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


def test_lm_eval_local_completions_equals_transformers(url, hf_model, tmp_path, monkeypatch):
    """lm-evaluation-harness's local-completions model on a small multiple-choice task file:
    every loglikelihood it reads through the server equals transformers' on the same tokens to
    1e-3, and so does its greedy flag."""
    import pathlib

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = pathlib.Path(__file__).parent / "data"
    (tmp_path / "facts.yaml").write_text((data / "facts.yaml").read_text().replace("DATA_FILE", str(data / "facts.jsonl")))
    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="shardserve-default", tokenizer_backend="remote",
                             num_concurrent=4, max_retries=1)
    out = simple_evaluate(model=lm, tasks=["shardserve_facts"], task_manager=TaskManager(include_path=str(tmp_path)),
                          log_samples=True, limit=None)
    samples = out["samples"]["shardserve_facts"]
    worst = 0.0
    for s in samples:
        for (context, continuation), ((ll, greedy),) in zip(s["arguments"], s["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            ref = _hf_logprobs(hf_model, ctx + cont)[len(ctx) - 1:-1]
            want = float(sum(ref[i, t] for i, t in enumerate(cont)))
            worst = max(worst, abs(ll - want))
            assert greedy == bool(all(int(torch.argmax(ref[i])) == t for i, t in enumerate(cont)))
    acc = out["results"]["shardserve_facts"]["acc,none"]
    print(f"lm-eval shardserve_facts: acc {acc:.3f} over {len(samples)} questions, max |ll - transformers| {worst:.2e}")
    assert len(samples) == 12 and worst < 1e-3 and acc >= 0.5


def test_n_seeded_choices_reproducible_and_the_prompt_prefilled_once(url):
    """n=3 seeded: three choices, the same again for the same request, choice 0 equal to n=1
    with that seed, streamed equal to not; the other choices copy the first's prompt blocks."""
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    kw = dict(model="shardserve-default", messages=[{"role": "user", "content": "Write a word about the sea."}],
              max_tokens=12, temperature=1.0, seed=1234)
    before = Client(url).shards()["timing"]
    r = sdk.chat.completions.create(**kw, n=3)
    after = Client(url).shards()["timing"]
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.message.content for c in sorted(sdk.chat.completions.create(**kw, n=3).choices,
                                                      key=lambda c: c.index)]
    assert sdk.chat.completions.create(**kw).choices[0].message.content == texts[0]
    streamed = ["", "", ""]
    for ch in sdk.chat.completions.create(**kw, n=3, stream=True):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts
    one = sdk.chat.completions.create(**{**kw, "max_tokens": 1})
    assert r.usage.prompt_tokens == one.usage.prompt_tokens          # one prompt, counted once
    assert after["prefix_hits"] - before["prefix_hits"] >= 2 and after["prefix_tokens"] - before["prefix_tokens"] >= 32


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"enum": ["Paris", "Rome", "Berlin"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


def test_structured_output_validates_streamed_and_not(url):
    """response_format json_schema (strict): every reply parses and validates, streamed or not,
    sampled hot; json_object parses; vLLM's guided_choice and guided_regex; a schema that does
    not compile is a 400 naming why."""
    import jsonschema
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    r = sdk.chat.completions.create(model="shardserve-default", messages=msgs, max_tokens=60, temperature=0.9,
                                    seed=3, n=4, response_format=fmt)
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), PERSON)
    text = "".join(ch.choices[0].delta.content or "" for ch in sdk.chat.completions.create(
        model="shardserve-default", messages=msgs, max_tokens=60, temperature=0.9, seed=4, response_format=fmt,
        stream=True) if ch.choices)
    jsonschema.validate(json.loads(text), PERSON)
    ask = [{"role": "user", "content": "Reply with a JSON object with one key, city, for the capital of France."}]
    obj = sdk.chat.completions.create(model="shardserve-default", messages=ask, max_tokens=200, temperature=0,
                                      response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].message.content), dict), \
        obj.choices[0].message.content
    pick = httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                                      "guided_choice": ["Berlin", "Paris", "Rome"]}).json()
    assert pick["choices"][0]["text"] in ("Berlin", "Paris", "Rome")
    rx = httpx.post(url + "/v1/completions", json={"prompt": "My phone number is", "max_tokens": 16, "temperature": 1,
                                                    "guided_regex": "[0-9]{3}-[0-9]{4}"}).json()
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", rx["choices"][0]["text"]), rx
    bad = httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert bad.status_code == 400 and "json_schema constraint does not compile" in bad.json()["error"]["message"]
    two = httpx.post(url + "/v1/completions", json={"prompt": "a", "guided_regex": "a", "guided_choice": ["b"]})
    assert two.status_code == 400 and "at most one output constraint" in two.json()["error"]["message"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_tool_calls_required_named_and_auto_streamed_and_not(url):
    """tool_choice required and named: the reply is a call whose arguments validate against
    the function's schema, as tool_calls, streamed as OpenAI streams them; auto: content or a
    valid call; a conversation carrying the call and its result goes on."""
    import jsonschema
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="shardserve-default", messages=msgs, tools=[WEATHER, CLOCK], max_tokens=80)
    for choice, want in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        r = sdk.chat.completions.create(**kw, tool_choice=choice, temperature=0.7, seed=5, n=3)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            call = c.message.tool_calls[0]
            fn = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
            assert want in (None, call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), fn["function"]["parameters"])
        chunks = list(sdk.chat.completions.create(**kw, tool_choice=choice, temperature=0, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [t for d in deltas for t in (d.tool_calls or [])]
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and calls[0].index == 0 and calls[0].id
        jsonschema.validate(json.loads("".join(t.function.arguments for t in calls)),
                            {"get_weather": WEATHER, "get_time": CLOCK}[calls[0].function.name]["function"]["parameters"])
    auto = sdk.chat.completions.create(**kw, temperature=0)
    c = auto.choices[0]
    assert (c.finish_reason == "tool_calls") == bool(c.message.tool_calls) and (c.message.content or c.message.tool_calls)
    call = r.choices[0].message.tool_calls[0]
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    again = sdk.chat.completions.create(model="shardserve-default", messages=follow, tools=[WEATHER, CLOCK],
                                        tool_choice="none", max_tokens=20, temperature=0)
    assert again.choices[0].message.content and again.choices[0].finish_reason in ("stop", "length")


def test_metrics_page_has_the_series_after_requests(url):
    """/metrics gathers the shardserve series from Ray's metrics agents: request latencies,
    tokens, the queue, each shard's KV blocks and step time, round trips, error codes."""
    from openai import OpenAI
    sdk = OpenAI(base_url=url + "/v1", api_key="unused")
    for _ in range(2):
        sdk.chat.completions.create(model="shardserve-default", messages=QUESTION, max_tokens=8, temperature=0)
    assert httpx.post(url + "/v1/chat/completions", json={"messages": []}).status_code == 400
    want = ["time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket", "request_latency_seconds_count",
            "prompt_tokens", "generation_tokens", "requests_running", "requests_waiting", "kv_blocks_used",
            "kv_blocks_total", "shard_step_seconds_bucket", "step_round_trip_seconds_bucket", "http_errors"]
    deadline, page = time.time() + 90, ""
    while time.time() < deadline:            # Ray's agents export every few seconds
        page = httpx.get(url + "/metrics", timeout=30).text
        if all(f"ray_shardserve_{w}" in page for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if f"ray_shardserve_{w}" not in page]
    assert not missing, f"missing {missing} in:\n{page[:3000]}"
    assert f'shard="{PREFIX}shard-1"' in page and 'code="400"' in page and 'kind="decode"' in page


def test_a_killed_replica_serves_the_same_port_again(url):
    """Last in the module: the replica that owns the users' port is killed; Serve starts another,
    which binds the same port at once (no quarantine, SO_REUSEADDR over the dead one's TIME_WAIT
    connections), re-adopts the running shards and answers as before."""
    import os
    import signal

    import psutil
    port = int(url.rsplit(":", 1)[1])
    client = Client(url)
    before = client.chat(QUESTION, max_tokens=12, temperature=0)
    owner = next(c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN)
    os.kill(owner, signal.SIGKILL)
    deadline = time.time() + 180
    while not client.healthy():
        assert time.time() < deadline, f"port {port} not served again within 180 s"
        time.sleep(0.5)
    after = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN}
    assert owner not in after and after
    assert client.chat(QUESTION, max_tokens=12, temperature=0) == before
