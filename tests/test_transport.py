"""Tier 1: the Transport's step deadline with stand-in shard handles (no Ray): a step out past
its deadline pings the shards, a shard that does not answer is declared hung (ShardLost, an
event with the detection time), a slow but answering one is waited for."""
import asyncio
import time

import pytest

import serving.control.shardset as shardset
import serving.control.transport as transport
from serving.control.shardset import ShardSet
from serving.control.transport import ShardLost, Transport
from shards.plan.layer_range import LayerRange
from shards.plan.plan import Plan, ShardSpec

pytestmark = pytest.mark.unit


class Handle:
    """A shard actor's `ping.remote()`: answered at once, or never (a stopped process)."""

    def __init__(self, hung: bool = False):
        self.hung, self.ping = hung, self

    def remote(self):
        fut = asyncio.get_running_loop().create_future()
        if not self.hung:
            fut.set_result(1)
        return fut


def make(handles) -> Transport:
    plan = Plan("m", len(handles), tuple(ShardSpec(k, LayerRange(k, k + 1)) for k in range(len(handles))))
    return Transport(ShardSet("m", plan, handles, 8, 16), channels=False)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(transport, "DEADLINE_FLOOR_S", 0.2)
    monkeypatch.setattr(shardset, "PING_TIMEOUT_S", 0.2)


def test_a_hung_shard_is_found_within_deadline_and_ping(fast):
    async def run():
        t = make([Handle(), Handle(hung=True)])
        t0 = time.monotonic()
        with pytest.raises(ShardLost, match=r"shard\(s\) \[1\] did not answer a ping"):
            await t._watched(asyncio.get_running_loop().create_future())    # a step that never returns
        return t, time.monotonic() - t0
    t, took = asyncio.run(run())
    (ev,) = list(t.shards.events)
    # detect_s is rounded to 10 ms in the event
    assert ev["action"] == "hung" and ev["shards"] == [1] and 0.35 <= ev["detect_s"] <= took + 0.005 < 5


def test_a_slow_step_of_answering_shards_is_waited_for(fast):
    async def run():
        t = make([Handle(), Handle()])
        slow = asyncio.ensure_future(asyncio.sleep(0.7, result="tokens"))
        return t, await t._watched(slow)
    t, out = asyncio.run(run())
    assert out == "tokens" and not t.shards.events and len(t.latencies[True]) == 1


def test_the_deadline_follows_the_steps_of_its_kind():
    t = make([Handle()])
    assert t.deadline_s() == transport.DEADLINE_FLOOR_S
    t.latencies[False].extend([0.4, 0.9])                 # prefill chunks: their own deadline
    t.latencies[True].extend([0.01, 0.7, 0.05])
    assert t.deadline_s(decode=False) == pytest.approx(transport.DEADLINE_FACTOR * 0.9)
    assert t.deadline_s(decode=True) == pytest.approx(transport.DEADLINE_FACTOR * 0.7)
    assert transport.DEADLINE_FACTOR * 0.9 > transport.DEADLINE_FLOOR_S    # both above the floor


def test_a_budget_change_to_a_hung_shard_gives_up_and_frees_the_lock(monkeypatch):
    """The shard never answers: the PATCH fails with ShardUnanswered after ANSWER_S instead of
    holding the change lock its re-placement needs."""
    import serving.control.reconfigurer as reconfigurer
    from serving.control.reconfigurer import Reconfigurer, ShardUnanswered
    monkeypatch.setattr(reconfigurer, "ANSWER_S", 0.2)

    class Hung(Handle):
        def __init__(self):
            super().__init__(hung=True)
            self.set_budget = self.stats = self

        def remote(self, *args):      # stats.remote(), set_budget.remote(bytes): never answered
            return super().remote()

    async def run():
        t = make([Hung()])
        r = Reconfigurer(t.shards, t)
        with pytest.raises(ShardUnanswered, match="shard 0 .* did not answer in 0 s"):
            await r.set_budget(0, None)
        assert not r._lock.locked()
    asyncio.run(asyncio.wait_for(run(), 5))      # without the give-up, this would wait for ever
