"""Tier 1: the router's own logic with a fake pipeline (no Ray): stop strings never leak a
prefix, a full waiting queue refuses, a request past its deadline is aborted and freed."""
import asyncio

import pytest

from serving.config import SchedulerSection
from serving.router.detokenizer import Detokenizer, stop_prefix_len
from serving.router.engine import Engine, _Flight
from serving.router.scheduler import Group, Sequence
from serving.router.stream import Overloaded, RequestStream, RequestTimeout
from shards.model.step import Sampled, SamplingParams

pytestmark = pytest.mark.unit


class CharTokenizer:
    """Token id = code point: decoding is exact and incremental, like a byte-level BPE."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


class FakeShards:
    kv_blocks, block_size, handles = 64, 4, [None, None]


class FakeTransport:
    """Launches nothing: every step stays in flight until a test answers it."""

    paused, on_resume, needs_connect = False, None, False

    def landed(self) -> None:
        pass

    async def drained(self) -> None:
        pass

    async def dead(self) -> list[int]:
        return []


class EchoTransport(FakeTransport):
    """Answers every step at once: each sequence's next token is `token`."""

    def __init__(self, token: int):
        self.token, self.steps = token, 0

    def launch(self, batch):
        import numpy as np
        self.steps += 1
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(Sampled(np.full(len(batch.seq_ids), self.token, dtype=np.int64).tolist()))
        return fut


class FakePipeline:
    """What the engine reads of a pipeline, without actors: nothing is ever launched."""

    def __init__(self):
        self.shards, self.transport = FakeShards(), FakeTransport()

    def close(self) -> None:
        pass


def engine(**limits) -> Engine:
    return Engine(FakePipeline(), CharTokenizer(), eos={0}, limits=SchedulerSection(**limits))


def emit_all(e: Engine, text: str, stop=(), max_tokens=100):
    """Feed text one character per step through _emit; returns the deltas' texts and the last."""
    seq = Sequence(1, [5], SamplingParams(max_tokens=max_tokens, stop=tuple(stop)))
    req = e.requests[1] = RequestStream(seq, Detokenizer(e.tokenizer, tuple(stop)))
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


def teststop_prefix_len():
    assert stop_prefix_len("hello wor", ["world"]) == 3
    assert stop_prefix_len("hello", ["xyz"]) == 0
    assert stop_prefix_len("aab", ["abc", "b!"]) == 2


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
        e.pipeline.transport.paused = True
        with pytest.raises(RequestTimeout, match="0.2 s timeout"):
            async for _ in e.generate([5, 6], SamplingParams(max_tokens=8)):
                pass
        assert not e.sched.waiting and not e.sched.running and not e.requests
        e.close()
    asyncio.run(run())


def test_frees_that_rode_on_a_failed_step_are_sent_again_unless_rebuilt():
    """A step carried frees of 7 (done) and 8 (preempted, waiting, no KV yet) and of 9, which
    was preempted and is being prefilled again: 7 and 8 go out again, 9 does not (its new KV
    would be dropped), and the failed group's own sequence is freed and requeued."""
    e = engine()
    e.recovery.start = lambda why: None            # no shards to check here
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
        e._finish_group(_Flight(group, [7, 8, 9], 0.0), fut)
    finally:
        loop.close()
    assert sorted(e._pending_free) == [1, 7, 8]
    assert [s.id for s in e.sched.waiting] == [1, 8] and 9 in e.sched.running


def test_recovery_is_single_flight():
    """Three callers at once start one check; each waits for it; a later call starts another."""
    from serving.router.recovery import Recovery
    calls = []

    async def check(why):
        calls.append(why)
        await asyncio.sleep(0.05)

    async def run():
        r = Recovery(check)
        await asyncio.gather(r.run("a"), r.run("b"), r.run("c"))
        assert calls == ["a"] and r.runs == 1 and not r.active
        await r.run("d")
        assert calls == ["a", "d"] and r.runs == 2
    asyncio.run(run())


def test_blocked_while_recovering():
    """Nothing launches from the moment a recovery starts until it ends."""
    async def run():
        e = engine()
        gate = asyncio.Event()

        async def check(why):
            await gate.wait()
        e.recovery._check = check
        e.recovery.start("step failed")
        assert e._blocked
        gate.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not e._blocked
        e.close()
    asyncio.run(run())


def test_the_loop_runs_a_request_to_its_end():
    """The router's loop end to end over a transport that answers at once: prefill, decode
    steps, detokenized text, the finish reason and the usage counts."""
    async def run():
        e = engine()
        e.pipeline.transport = EchoTransport(ord("A"))
        out = await asyncio.wait_for(e.complete([5, 6, 7], SamplingParams(max_tokens=3)), 10)
        assert (out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("AAA", "length", 3, 3)
        assert e.pipeline.transport.steps == 3 and not e.sched.running and not e.requests
        e.close()
    asyncio.run(run())


def test_a_fault_in_the_router_fails_only_its_group_and_the_loop_goes_on():
    """The first step cannot even be submitted and the detokenizer raises once later: each
    fault is counted in loop_errors, the sequence recomputes, and the request still ends with
    the right text; a fault every time ends the request with an error instead of a hang."""
    class Flaky(EchoTransport):
        def launch(self, batch):
            self.steps += 1
            if self.steps == 1:
                raise RuntimeError("submit failed")
            return super().launch(batch)

    class OnceBadTokenizer(CharTokenizer):
        calls = 0

        def decode(self, ids, skip_special_tokens=True):
            OnceBadTokenizer.calls += 1
            if OnceBadTokenizer.calls == 3:
                raise UnicodeError("decoder fault")
            return super().decode(ids, skip_special_tokens)

    async def run():
        e = Engine(FakePipeline(), OnceBadTokenizer(), eos={0}, limits=SchedulerSection())
        e.pipeline.transport = Flaky(ord("B"))
        out = await asyncio.wait_for(e.complete([5, 6], SamplingParams(max_tokens=3)), 10)
        assert out.text == "BBB" and out.finish_reason == "length"
        assert [x["where"] for x in e.loop_errors] == ["launch", "finish"]
        assert e._loop_task is not None and not e._loop_task.done()
        e.pipeline.transport = EchoTransport(ord("B"))
        e.tokenizer = type("Broken", (), {"decode": lambda self, ids, skip_special_tokens=True: 1 / 0})()
        bad = await asyncio.wait_for(e.complete([5, 6], SamplingParams(max_tokens=3)), 10)
        assert bad.finish_reason == "error" and "ZeroDivisionError" in bad.error
        e.close()
    asyncio.run(run())
