"""Tier 2: the controller and failure recovery on a local Ray, with the real model.

One 2-shard pipeline serves every test in turn (each leaves it whole); outputs are compared
with the one-process reference generator, token for token.
"""
import asyncio
import time

import pytest

from serving.config import load
from serving.launch import build_engine
from shards.model.step import SamplingParams
from shards.plan.plan import Recompress
from tests.conftest import chat_ids, prompts

pytestmark = pytest.mark.ray
PREFIX = "ctl-"
CONTROL = {"readings": 2, "quiet_s": 5, "relax_s": 3600, "actions": ["move", "split", "recompress"]}



@pytest.fixture(scope="module")
def engine(loop):
    from shards.runtime.actor import stop_pipeline
    e = loop.run_until_complete(build_engine(load(shards=2, prefix=PREFIX, kv_tokens=4096, compile=False, compression="fp32",
                                                   controller=CONTROL)))
    yield e
    e.close()
    stop_pipeline(PREFIX)


@pytest.fixture(scope="module")
def reference(source, tokenizer):
    """Greedy outputs of the one-process generator for 32 prompts, 24 tokens each."""
    from shards.model.generator import Generator
    inputs = [chat_ids(tokenizer, p) for p in prompts(32, start=200)]
    return inputs, Generator(source, 1).generate(inputs, SamplingParams(max_tokens=24))


async def until(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


async def kv_drained(engine):
    """Frees ride on the next step or go out when the router idles: wait for that."""
    for _ in range(100):
        stats = await engine.stats()
        if all(s.kv_blocks_used == 0 and s.live_sequences == 0 for s in stats):
            return stats
        await asyncio.sleep(0.1)
    raise AssertionError(f"KV not freed: {[(s.kv_blocks_used, s.live_sequences) for s in stats]}")


def test_budget_below_use_controller_moves_layers_outputs_identical(loop, engine, reference):
    inputs, want = reference

    async def scenario():
        tasks = [asyncio.ensure_future(engine.complete(ids, SamplingParams(max_tokens=24))) for ids in inputs]
        await until(lambda: sum(len(s.generated) for s in engine.sched.running.values()) > 8, 120, "decoding")
        st = (await engine.stats())[0]
        used = st.rss_bytes - st.base_rss_bytes
        n_events, t0 = len(engine.pipeline.shards.events), time.time()
        await engine.set_budget(0, int(0.8 * used))
        await until(lambda: len(engine.pipeline.shards.events) > n_events, 30, "a controller action")
        acted_s = time.time() - t0
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return used, acted_s, outs

    try:
        used, acted_s, outs = loop.run_until_complete(scenario())
        ev = engine.pipeline.shards.events[-1]
        print(f"budget {0.8 * used / 2**20:.0f} MiB under use {used / 2**20:.0f} MiB: {ev['action']} after "
              f"{acted_s:.1f} s ({ev['seconds']:.1f} s to carry out): {ev['reason']}")
        assert ev["ok"] and ev["action"] == "move" and ev["shard"] == 0
        assert ev["after"][0]["end"] < ev["before"][0]["end"] and "budget" in ev["reason"]
        assert [d.token_ids for d in outs] == want
        stats = loop.run_until_complete(kv_drained(engine))
        assert stats[0].end == engine.plan.shards[0].layers.end == ev["after"][0]["end"]
        # the move brought shard 0 under its budget (the controller then stays quiet)
        print(f"after the move: {(stats[0].rss_bytes - stats[0].base_rss_bytes) / 2**20:.0f} MiB used, "
              f"{stats[0].rss_bytes / 2**20:.0f} MiB resident (less shared memory)")
        assert stats[0].rss_bytes - stats[0].base_rss_bytes < 0.95 * stats[0].budget_bytes
    finally:   # a failure here must not leave the budget to act on the next tests
        loop.run_until_complete(engine.set_budget(0, None))


def test_a_new_router_adopts_the_pipeline_as_it_is_now(engine):
    """After the move, the shards no longer match a fresh plan: a router that starts over them
    (a restarted Serve replica) reads their layers back instead of trusting the plan."""
    from serving.launch import make_plan, start
    cfg = load(shards=2, prefix=PREFIX, kv_tokens=4096, compile=False, compression="fp32", controller=CONTROL)
    fresh = [s.layers for s in make_plan(cfg).shards]
    plan, handles, _, names = start(cfg)
    now = engine.pipeline.shards
    assert [s.layers for s in plan.shards] == [s.layers for s in now.plan.shards] != fresh
    assert names == now.names and [h._actor_id for h in handles] == [h._actor_id for h in now.handles]


def test_recompress_one_shard_under_load(loop, engine, reference, source):
    from shards.compress.costs import measure_costs
    from shards.plan.planner import shard_weight_bytes
    inputs = reference[0][:16]

    async def scenario():
        tasks = [asyncio.ensure_future(engine.complete(ids, SamplingParams(max_tokens=24))) for ids in inputs]
        await until(lambda: sum(len(s.generated) for s in engine.sched.running.values()) > 8, 120, "decoding")
        before = (await engine.stats())[1]
        event = await engine.apply(Recompress(1, "w8a16", "test"))
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return before, event, outs

    before, event, outs = loop.run_until_complete(scenario())
    assert all(d.finish_reason in ("stop", "length") and d.completion_tokens > 0 for d in outs)
    after = loop.run_until_complete(kv_drained(engine))[1]
    rng = engine.plan.shards[1].layers
    want_fp32 = shard_weight_bytes(measure_costs(source, "fp32"), rng)
    want_int8 = shard_weight_bytes(measure_costs(source, "w8a16"), rng)
    assert (before.weight_bytes, after.weight_bytes) == (want_fp32, want_int8)
    saved, rss_drop = want_fp32 - want_int8, before.rss_bytes - after.rss_bytes
    print(f"shard 1 {rng} fp32 -> w8a16 in {event['seconds']:.1f} s: weights {want_fp32 / 2**20:.0f} -> "
          f"{want_int8 / 2**20:.0f} MiB (x{want_int8 / want_fp32:.2f}), RSS {before.rss_bytes / 2**20:.0f} -> "
          f"{after.rss_bytes / 2**20:.0f} MiB (-{rss_drop / 2**20:.0f})")
    assert after.compression == "w8a16" == engine.plan.shards[1].compression
    assert rss_drop > 0.8 * saved
    loop.run_until_complete(engine.apply(Recompress(1, "fp32", "test: back")))


def test_kill_shard_1_mid_generation_token_identical(loop, engine, reference):
    import ray
    inputs, want = reference[0][:16], reference[1][:16]

    async def scenario():
        tasks = [asyncio.ensure_future(engine.complete(ids, SamplingParams(max_tokens=24))) for ids in inputs]
        await until(lambda: sum(len(s.generated) for s in engine.sched.running.values()) > 16, 120, "decoding")
        old_pid = (await engine.stats())[1].pid
        assert engine.pipeline.transport.channels_active   # steps go over the step channels
        t0 = time.time()
        ray.kill(ray.get_actor(f"{PREFIX}shard-1", namespace="shardserve"))
        await until(lambda: any(e["action"] == "restart" and e["ok"] for e in engine.pipeline.shards.events), 120,
                    "shard 1 re-placed")
        recovered = time.time() - t0
        steps = engine.pipeline.transport.channel_steps
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return old_pid, recovered, time.time() - t0, outs, steps

    old_pid, recovered, total, outs, steps = loop.run_until_complete(scenario())
    print(f"shard-1 killed: re-placed in {recovered:.1f} s, all 16 requests done {total:.1f} s after the kill")
    assert [d.token_ids for d in outs] == want
    # reconnected to the new actor: the rest of the replies went over channels again
    assert engine.pipeline.transport.channels_active and engine.pipeline.transport.channel_steps > steps
    stats = loop.run_until_complete(kv_drained(engine))
    assert stats[1].pid != old_pid and engine.down is None


def test_a_hung_shard_is_found_killed_and_replaced(loop, engine, reference):
    """Shard 1 stops (SIGSTOP) with steps in flight: the step deadline pings it, declares it
    hung, the router kills and re-places it, and every request completes token-identical."""
    import os
    import signal
    inputs, want = reference[0][:8], reference[1][:8]

    async def scenario():
        tasks = [asyncio.ensure_future(engine.complete(ids, SamplingParams(max_tokens=24))) for ids in inputs]
        await until(lambda: sum(len(s.generated) for s in engine.sched.running.values()) > 8, 120, "decoding")
        pid, seen = (await engine.stats())[1].pid, len(engine.pipeline.shards.events)
        os.kill(pid, signal.SIGSTOP)
        try:
            outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)      # it was killed; if not, it must not stay stopped
            except ProcessLookupError:
                pass
        return pid, list(engine.pipeline.shards.events)[seen:], outs

    pid, events, outs = loop.run_until_complete(scenario())
    hung = [e for e in events if e["action"] == "hung"]
    restarts = [e for e in events if e["action"] == "restart" and e["ok"]]
    print(f"hung shard: found after {hung[0]['detect_s']} s (deadline {hung[0]['deadline_s']} s), "
          f"re-placed in {restarts[0]['seconds']:.1f} s")
    assert hung and 1 in hung[0]["shards"] and restarts and restarts[0]["shard"] == 1
    assert [d.token_ids for d in outs] == want
    stats = loop.run_until_complete(kv_drained(engine))
    assert stats[1].pid != pid and engine.down is None


def test_step_that_raises_once_is_recomputed(loop, engine, reference):
    inputs, want = reference[0][:8], reference[1][:8]

    async def scenario():
        tasks = [asyncio.ensure_future(engine.complete(ids, SamplingParams(max_tokens=24))) for ids in inputs]
        await until(lambda: sum(len(s.generated) for s in engine.sched.running.values()) > 8, 120, "decoding")
        errors = len(engine.step_errors)
        await engine.shards[1].inject_fault.remote(1, "boom")
        return errors, await asyncio.wait_for(asyncio.gather(*tasks), 300)

    errors, outs = loop.run_until_complete(scenario())
    assert len(engine.step_errors) == errors + 1 and "boom" in engine.step_errors[-1]["error"]
    assert [d.token_ids for d in outs] == want
    loop.run_until_complete(kv_drained(engine))


def test_step_that_always_raises_ends_requests_with_an_error(loop, engine, reference):
    inputs = reference[0][:4]

    async def scenario():
        await engine.shards[0].inject_fault.remote(1000, "always")
        try:
            return await asyncio.wait_for(asyncio.gather(
                *(engine.complete(ids, SamplingParams(max_tokens=8)) for ids in inputs)), 120)
        finally:
            await engine.shards[0].inject_fault.remote(0)

    outs = loop.run_until_complete(scenario())
    assert all(d.finish_reason == "error" and "always" in d.error and "3 times" in d.error for d in outs)
    loop.run_until_complete(kv_drained(engine))
    ok = loop.run_until_complete(engine.complete(inputs[0], SamplingParams(max_tokens=8)))
    assert ok.finish_reason in ("stop", "length")


def test_controller_comes_back_and_readopts(loop, engine):
    import ray
    ctl = ray.get_actor(f"{PREFIX}controller", namespace="shardserve")
    ray.kill(ctl, no_restart=False)

    async def readopted():
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                st = await ray.get_actor(f"{PREFIX}controller", namespace="shardserve").status.remote(PREFIX)
                if st.get("readings"):
                    return st
            except Exception:   # restarting
                pass
            await asyncio.sleep(0.5)
        raise AssertionError("controller did not come back and poll the pipeline")

    st = loop.run_until_complete(readopted())
    assert st["names"] == engine.pipeline.shards.names and len(st["readings"][-1]) == 2


def test_compiled_graph_steps_and_survives_a_killed_shard(loop, reference):
    """compiled_graph: steps go through a Ray Compiled Graph; a shard killed with steps in
    flight is noticed (the graph alone would wait for good), re-placed, the graph rebuilt over
    the new actor, and every output equals the one-process reference."""
    import ray

    from shards.runtime.actor import stop_pipeline
    e = loop.run_until_complete(build_engine(load(shards=2, prefix="ctlg-", kv_tokens=4096, compile=False, compression="fp32",
                                                   control=False, compiled_graph=True)))
    inputs, want = reference[0][:8], reference[1][:8]

    async def scenario():
        tasks = [asyncio.ensure_future(e.complete(ids, SamplingParams(max_tokens=24))) for ids in inputs]
        await until(lambda: sum(len(s.generated) for s in e.sched.running.values()) > 16, 120, "decoding")
        assert e.pipeline.transport.graph_steps > 0 and e.pipeline.transport.graph_built
        ray.kill(ray.get_actor("ctlg-shard-1", namespace="shardserve"))
        await until(lambda: any(ev["action"] == "restart" and ev["ok"] for ev in e.pipeline.shards.events), 120,
                    "shard 1 re-placed")
        before = e.pipeline.transport.graph_steps
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return before, outs
    try:
        before, outs = loop.run_until_complete(scenario())
        assert [d.token_ids for d in outs] == want
        assert any(ev["action"] == "graph" and not ev["ok"] for ev in e.pipeline.shards.events)
        assert e.pipeline.transport.graph_steps > before and e.pipeline.transport.graph_built   # rebuilt, in use
    finally:
        e.close()
        stop_pipeline("ctlg-")

