"""Tier 2: shard actors on a local Ray, the pipelined router, re-sharding with live KV."""
import asyncio

import pytest
import torch

from serving.config import load
from serving.launch import build_engine
from serving.router.prefix import MIN_PIECE, common_prefix
from shards import LayerRange
from shards.model.step import SamplingParams
from tests.conftest import chat_ids, prompts

pytestmark = pytest.mark.ray
N_TOKENS = 32



def make_engine(loop, shards, prefix, **kw):
    return loop.run_until_complete(build_engine(load(shards=shards, prefix=prefix, kv_tokens=4096,
                                                  **{"compile": False, "compression": "fp32", **kw})))


def kill(engine):
    from shards.runtime.actor import stop_pipeline
    engine.close()
    stop_pipeline(engine.pipeline.shards.prefix)


@pytest.fixture(scope="module")
def reference(tokenizer, hf_model):
    """transformers' greedy generate for 20 prompts (stops at eos, like the engine)."""
    out = {}
    for p in prompts(20, start=20):
        ids = chat_ids(tokenizer, p)
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False)
        out[tuple(ids)] = gen[0, len(ids):].tolist()
    return out


async def run_all(engine, prompts_ids, params):
    return await asyncio.gather(*(engine.complete(ids, params) for ids in prompts_ids))


@pytest.mark.parametrize("shards", [2, 3])
def test_concurrent_greedy_matches_transformers(loop, reference, shards):
    engine = make_engine(loop, shards, f"eq{shards}-")
    try:
        # built means warm: one short request has run a prefill and a decode step on every shard
        assert all(s.steps >= 2 for s in loop.run_until_complete(engine.stats()))
        inputs = [list(k) for k in reference]
        outs = loop.run_until_complete(run_all(engine, inputs, SamplingParams(max_tokens=N_TOKENS)))
        for ids, d in zip(inputs, outs):
            assert d.token_ids == reference[tuple(ids)]
        stats = loop.run_until_complete(engine.stats())
        assert all(s.kv_blocks_used == 0 and s.live_sequences == 0 for s in stats)
        assert [(s.start, s.end) for s in stats] == [(r.start, r.end) for r in engine.plan.ranges]
    finally:
        kill(engine)


@pytest.fixture(scope="module")
def engine2(loop):
    engine = make_engine(loop, 2, "two-")
    yield engine
    kill(engine)


def test_prompts_after_a_cached_prefix_match_transformers(loop, reference, engine2):
    """Once the first prompt is pinned, the others copy every token they share with it (the
    chat template's system prompt, past a KV block's edge) on both shards and prefill only the
    rest, with transformers' greedy tokens; holders are not requests' KV."""
    inputs = [list(k) for k in reference][:8]
    params = SamplingParams(max_tokens=N_TOKENS)
    before = engine2.prefix_stats()
    first = loop.run_until_complete(engine2.complete(inputs[0], params))
    outs = [first] + loop.run_until_complete(run_all(engine2, inputs[1:], params))
    after = engine2.prefix_stats()
    assert after["prefix_hits"] - before["prefix_hits"] >= 7
    shared = [min(common_prefix(inputs[0], ids), len(ids) - MIN_PIECE) for ids in inputs[1:]]
    assert any(n % 16 for n in shared) and min(shared) >= 16   # copies end inside a block
    assert after["prefix_tokens"] - before["prefix_tokens"] >= sum(shared)
    for ids, d in zip(inputs, outs):
        assert d.token_ids == reference[tuple(ids)]
    stats = loop.run_until_complete(engine2.stats())
    assert all(s.prefix_holders >= 1 and s.prefix_blocks >= 1 for s in stats)
    assert all(s.kv_blocks_used == 0 and s.live_sequences == 0 for s in stats)


def test_32_concurrent_different_lengths_then_kv_zero(loop, engine2, tokenizer):
    texts = [" ".join(prompts(1 + (i % 8) * 3, start=i)) for i in range(32)]
    inputs = [chat_ids(tokenizer, t) for t in texts]
    lens = sorted({len(x) for x in inputs})
    assert lens[-1] > 4 * lens[0]  # genuinely different lengths (some chunked over 256 tokens)
    outs = loop.run_until_complete(run_all(engine2, inputs, SamplingParams(max_tokens=24)))
    assert all(d.finish_reason in ("stop", "length") and d.completion_tokens >= 1 for d in outs)
    stats = loop.run_until_complete(engine2.stats())
    assert all(s.kv_bytes_used == 0 and s.live_sequences == 0 for s in stats), \
        [(s.kv_bytes_used, s.live_sequences, s.prefix_holders, s.prefix_blocks) for s in stats]


def test_shards_overlap_in_time(loop, engine2, tokenizer):
    inputs = [chat_ids(tokenizer, p) for p in prompts(16, start=100)]
    engine2.hops.clear()
    before = loop.run_until_complete(engine2.stats())
    t0 = max(e for s in before for _, e in s.busy[-1:]) if before[0].busy else 0
    loop.run_until_complete(run_all(engine2, inputs, SamplingParams(max_tokens=32)))
    s0, s1 = [[(a, b) for a, b in s.busy if a > t0] for s in loop.run_until_complete(engine2.stats())]
    overlap = sum(max(0.0, min(b0, b1) - max(a0, a1)) for a0, b0 in s0 for a1, b1 in s1)
    busy0 = sum(b - a for a, b in s0)
    # per-hop overhead: a group's round trip minus its compute on each shard, over 3 hops
    # (router -> s0 -> s1 -> router); an upper bound, as it includes waiting behind other groups
    compute = sum(b - a for a, b in s0) / len(s0) + sum(b - a for a, b in s1) / len(s1)
    trip = sum(h for _, h, _ in engine2.hops) / len(engine2.hops)
    print(f"shard 0 busy {busy0:.2f} s, overlapping shard 1 for {overlap:.2f} s ({overlap / busy0:.0%}); "
          f"group round trip {1000 * trip:.1f} ms, compute {1000 * compute:.1f} ms, "
          f"<= {1000 * (trip - compute) / 3:.1f} ms per hop")
    assert overlap > 0.2 * busy0


def test_move_layers_mid_generation_token_identical(loop, tokenizer, source):
    from shards.model.generator import Generator
    inputs = [chat_ids(tokenizer, p) for p in prompts(8, start=60)]
    params = SamplingParams(max_tokens=40)
    want = Generator(source, 1).generate(inputs, params)
    engine = make_engine(loop, 2, "mv-")
    try:
        async def scenario():
            tasks = [asyncio.ensure_future(engine.complete(ids, params)) for ids in inputs]
            while max((len(s.generated) for s in engine.sched.running.values()), default=0) < 10:
                await asyncio.sleep(0.01)
            live = len(engine.sched.running)
            rss0 = (await engine.stats())[0].rss_bytes
            b = engine.plan.shards[0].layers.end
            await engine.move_layers(0, 1, LayerRange(b - 5, b))
            return live, rss0, await asyncio.gather(*tasks)

        live, rss0, outs = loop.run_until_complete(scenario())
        assert live >= 4
        assert [d.token_ids for d in outs] == want
        after = loop.run_until_complete(engine.stats())
        assert (after[0].end, after[1].start) == (engine.plan.shards[0].layers.end,) * 2
        print(f"shard 0 RSS {rss0 / 2**20:.0f} -> {after[0].rss_bytes / 2**20:.0f} MiB")
        assert after[0].rss_bytes < rss0 - 3 * 14 * 2**20   # 5 layers of 13.5 MiB weights left
    finally:
        kill(engine)


def test_compressed_shards(loop, tokenizer, source):
    """Shards quantized at load (w8a16): stats report it, bytes match the plan, answer holds."""
    from shards.compress.costs import measure_costs
    from shards.plan.planner import shard_weight_bytes
    engine = make_engine(loop, 2, "q8-", compression="w8a16")
    try:
        ids = chat_ids(tokenizer, "What is the capital of France?")
        d = loop.run_until_complete(engine.complete(ids, SamplingParams(max_tokens=16)))
        assert d.text.strip() == "The capital of France is Paris."
        stats = loop.run_until_complete(engine.stats())
        costs = measure_costs(source, "w8a16")
        for s, spec in zip(stats, engine.plan.shards):
            assert s.compression == "w8a16"
            assert s.weight_bytes == shard_weight_bytes(costs, spec.layers) == spec.weight_bytes
    finally:
        kill(engine)


def test_a_router_attaching_frees_what_a_dead_one_left(loop):
    """A router that died mid-sequence leaves KV on the shards; the next router of that pipeline
    (a restarted Serve replica) frees it before serving, so no id of the old one lingers."""
    import ray

    from shards.model.step import StepBatch
    first = make_engine(loop, 2, "att-", control=False)
    h0 = first.shards[0]
    ray.get(h0.forward.remote(StepBatch([123], [0], [4], tokens=torch.tensor([[1, 2, 3, 4]]))))
    assert ray.get(h0.stats.remote()).live_sequences == 1      # as a dead router would leave it
    first.close()
    second = make_engine(loop, 2, "att-", control=False)
    try:
        assert ray.get(second.shards[0].stats.remote()).live_sequences == 0
    finally:
        kill(second)
