"""Tier 3 (slow): load with a shard killed mid-run, and a 1,000-request soak.

    .venv/bin/python -m pytest -q -m slow tests/test_soak.py -s
"""
import asyncio
import time

import psutil
import pytest

from serving.config import load
from serving.launch import build_engine
from shards.model.step import SamplingParams
from tests.conftest import chat_ids, prompts

pytestmark = [pytest.mark.slow, pytest.mark.ray]



def pipeline(loop, prefix):
    return loop.run_until_complete(build_engine(load(shards=2, prefix=prefix, kv_tokens=4096, compile=False, compression="fp32")))


async def at_concurrency(engine, inputs, c, params):
    sem = asyncio.Semaphore(c)

    async def one(ids):
        async with sem:
            return await engine.complete(ids, params)
    return await asyncio.gather(*(one(ids) for ids in inputs))


def test_200_requests_at_32_with_a_shard_killed(loop, tokenizer):
    import ray

    from shards.runtime.actor import stop_pipeline
    inputs = [chat_ids(tokenizer, p) for p in prompts(200, start=100)]
    params = SamplingParams(max_tokens=32)
    engine = pipeline(loop, "load-")
    try:
        calm = loop.run_until_complete(at_concurrency(engine, inputs, 32, params))

        async def with_kill():
            run = asyncio.ensure_future(at_concurrency(engine, inputs, 32, params))
            await asyncio.sleep(20)
            t0 = time.time()
            ray.kill(ray.get_actor("load-shard-1", namespace="shardserve"))
            outs = await run
            return outs, time.time() - t0

        outs, after = loop.run_until_complete(with_kill())
        restarts = [e for e in engine.pipeline.shards.events if e["action"] == "restart"]
        print(f"200 requests at c=32, shard-1 killed 20 s in: {sum(d.finish_reason == 'error' for d in outs)} failed, "
              f"re-placed in {restarts[0]['seconds']:.1f} s, done {after:.0f} s after the kill, "
              f"{len(engine.step_errors)} failed steps recomputed")
        assert all(d.finish_reason in ("stop", "length") for d in outs)
        assert [d.token_ids for d in outs] == [d.token_ids for d in calm]
        assert len(restarts) == 1 and restarts[0]["ok"]
    finally:
        engine.close()
        stop_pipeline("load-")


def test_soak_1000_requests_memory_flat(loop, tokenizer):
    """RSS of every process of the pipeline (router here, shards, controller) after a warm-up
    and after 1,000 requests: flat within 5%; KV blocks 0 at the end."""
    import ray

    from shards.runtime.actor import stop_pipeline
    inputs = [chat_ids(tokenizer, p) for p in prompts(500)] * 2
    params = SamplingParams(max_tokens=16)
    engine = pipeline(loop, "soak-")

    def rss() -> dict:
        stats = loop.run_until_complete(engine.stats())
        ctl = ray.get(ray.get_actor("soak-controller", namespace="shardserve").rss.remote())
        return {"router": psutil.Process().memory_info().rss, "controller": ctl,
                **{f"shard-{k}": s.rss_bytes for k, s in enumerate(stats)}}
    try:
        loop.run_until_complete(at_concurrency(engine, inputs[:64], 32, params))   # warm-up
        before, t0 = rss(), time.time()
        outs = loop.run_until_complete(at_concurrency(engine, inputs, 32, params))
        after = rss()
        print(f"soak: {len(outs)} requests in {time.time() - t0:.0f} s; RSS MiB before -> after: " +
              ", ".join(f"{k} {before[k] / 2**20:.0f} -> {after[k] / 2**20:.0f}" for k in before))
        assert all(d.finish_reason in ("stop", "length") for d in outs)
        for k in before:
            assert after[k] <= 1.05 * before[k], f"{k} grew {before[k] / 2**20:.0f} -> {after[k] / 2**20:.0f} MiB"
        stats = loop.run_until_complete(engine.stats())
        assert all(s.kv_blocks_used == 0 for s in stats)
    finally:
        engine.close()
        stop_pipeline("soak-")
