"""Tier 1: the router's own logic with a fake pipeline (no Ray): stop strings never leak a
prefix, a full waiting queue refuses, a request past its deadline is aborted and freed."""
import asyncio

import pytest

from serving.router.engine import Engine, Overloaded, RequestTimeout, _stop_prefix_len
from serving.router.scheduler import Group, Sequence
from shards.model.step import SamplingParams

pytestmark = pytest.mark.unit


class CharTokenizer:
    """Token id = code point: decoding is exact and incremental, like a byte-level BPE."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


class FakePipeline:
    kv_blocks, block_size, handles, paused = 64, 4, [None, None], False

    def __init__(self):
        self.on_resume = None

    def close(self) -> None:
        pass


def engine(**kw) -> Engine:
    return Engine(FakePipeline(), CharTokenizer(), eos={0}, **kw)


def emit_all(e: Engine, text: str, stop=(), max_tokens=100):
    """Feed text one character per step through _emit; returns the deltas' texts and the last."""
    from serving.router.engine import _Request
    seq = Sequence(1, [5], SamplingParams(max_tokens=max_tokens, stop=tuple(stop)))
    req = e.requests[1] = _Request(seq)
    e.sched.running[1] = seq
    out = []
    for i, ch in enumerate(text):
        seq.generated.append(ord(ch))
        if i == len(text) - 1 and len(seq.generated) >= max_tokens:
            seq.finished = "length"
        e._emit(seq)
        out.append(req.queue.get_nowait())
        if out[-1].finish_reason:
            break
    return [d.text for d in out], out[-1]


def test_stop_prefix_len():
    assert _stop_prefix_len("hello wor", ["world"]) == 3
    assert _stop_prefix_len("hello", ["xyz"]) == 0
    assert _stop_prefix_len("aab", ["abc", "b!"]) == 2


def test_stop_string_prefix_never_sent():
    texts, last = emit_all(engine(), "Paris. ENDx", stop=["END"])
    assert "".join(texts) == "Paris. " and last.finish_reason == "stop"
    assert all("E" not in t for t in texts)              # 'E', 'EN' were held, never sent


def test_held_text_released_when_it_does_not_become_a_stop():
    texts, last = emit_all(engine(), "a ENx b", stop=["END"], max_tokens=7)
    assert texts == ["a", " ", "", "", "ENx", " ", "b"] and last.finish_reason == "length"


def test_stop_in_the_last_token_wins_over_length():
    texts, last = emit_all(engine(), "abEND", stop=["END"], max_tokens=5)
    assert "".join(texts) == "ab" and last.finish_reason == "stop"


def test_full_waiting_queue_refuses():
    async def run():
        e = engine(max_waiting=0)
        with pytest.raises(Overloaded, match="max_waiting 0"):
            await e.generate([5, 6], SamplingParams()).__anext__()
        e.close()
    asyncio.run(run())


def test_request_past_its_deadline_is_aborted():
    """Nothing ever answers (the fake pipeline launches nothing): the request times out, and
    its sequence leaves the scheduler."""
    async def run():
        e = engine(timeout_s=0.2)
        e.pipeline.paused = True
        with pytest.raises(RequestTimeout, match="0.2 s timeout"):
            async for _ in e.generate([5, 6], SamplingParams()):
                pass
        assert not e.sched.waiting and not e.sched.running and not e.requests
        e.close()
    asyncio.run(run())


def test_frees_that_rode_on_a_failed_step_are_sent_again_unless_rebuilt():
    """A step carried frees of 7 (done) and 8 (preempted, waiting, no KV yet) and of 9, which
    was preempted and is being prefilled again: 7 and 8 go out again, 9 does not (its new KV
    would be dropped), and the failed group's own sequence is freed and requeued."""
    e = engine()
    e._start_recovery = lambda why: None           # no shards to check here
    e.pipeline.landed = lambda: None
    rebuilding, waiting = Sequence(9, [5, 6], SamplingParams()), Sequence(8, [5], SamplingParams())
    rebuilding.in_flight = 2
    e.sched.running[9] = rebuilding
    e.sched.waiting.append(waiting)
    e.sched.running[1] = Sequence(1, [5, 6], SamplingParams())
    e.sched.running[1].in_flight = 2
    group = Group((1,), (0,), ((5, 6),), (SamplingParams(),), (0,), (True,), True)
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        fut.set_exception(RuntimeError("shard 0 raised"))
        fut.freed, fut.launched = [7, 8, 9], 0.0
        e._finish_group(group, fut)
    finally:
        loop.close()
    assert sorted(e._pending_free) == [1, 7, 8]
    assert [s.id for s in e.sched.waiting] == [1, 8] and 9 in e.sched.running
