"""Tier 1: the step channel (shards/runtime/channel.py) without Ray: the wire format, and a server with a
stand-in handler over a real localhost socket."""
import asyncio
import socket

import numpy as np
import pytest
import torch

from shards.model.step import Sampled, SamplingParams, StepBatch, from_wire
from shards.runtime.channel import (
    ChannelBroken,
    ChannelServer,
    StepChannel,
    decode_step,
    encode_reply,
    encode_step,
    frame,
    next_step,
)

pytestmark = pytest.mark.unit


def _batch(**kw) -> StepBatch:
    base = dict(seq_ids=[2 ** 62 + 5, 7], starts=[0, 12], q_lens=[3, 1],
                tokens=np.array([[1, 2, 3], [4, 0, 0]], dtype=np.int64),
                sampling=[SamplingParams(), SamplingParams(0.7, 0.9, 40, 11, 16, ("\n\n", "END"), 3, 1)],
                steps=[0, 5], free=[99], alone=True, targets=[[2, 3, 9], []])
    return StepBatch(**{**base, **kw})


def test_a_step_crosses_the_wire_whole():
    b = _batch()
    header, body = encode_step(b)
    got = decode_step(header, bytearray(body))
    assert (got.seq_ids, got.starts, got.q_lens, got.steps, got.free, got.alone, got.layer) == \
        (b.seq_ids, b.starts, b.q_lens, b.steps, b.free, b.alone, 0)
    assert got.sampling == b.sampling and got.hidden is None and got.targets == [[2, 3, 9], []]
    assert got.tokens.dtype == np.int64 and np.array_equal(got.tokens, b.tokens)
    assert torch.equal(from_wire(got.tokens), torch.from_numpy(b.tokens)) and got.tokens.flags.writeable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_states_pass_to_the_next_shard_bit_exact(dtype):
    hidden = torch.randn(2, 3, 8).to(dtype)
    header, body = encode_step(_batch())
    reply, out = encode_reply(StepBatch([1], [0], [3], None, hidden if dtype == torch.bfloat16 else hidden.numpy(),
                                        layer=19))
    got = decode_step(next_step(header, reply), bytearray(out))
    assert got.tokens is None and got.seq_ids == _batch().seq_ids
    assert got.layer == 19        # the layer the next shard must start at travels with the step
    assert torch.equal(from_wire(got.hidden), hidden)


def test_last_shard_reply_is_token_ids_and_logprobs():
    assert encode_reply(Sampled([5, 17])) == ({"ok": True, "tokens": [5, 17], "logprobs": None}, b"")
    lps = [None, [[-0.5, [[17, -0.5]]], [[-2.0, []]]]]
    assert encode_reply(Sampled([5, 17], lps))[0]["logprobs"] == lps


def test_other_dtypes_are_refused_by_name():
    with pytest.raises(TypeError, match="int32"):
        encode_step(_batch(tokens=np.zeros((1, 1), dtype=np.int32)))


def _echo(header, body):
    """A stand-in shard: hidden states out = tokens in, as float32; 'boom' in free raises."""
    if 666 in header["free"]:
        raise ValueError("shard 0: boom")
    x = decode_step(header, body)
    return encode_reply(StepBatch(x.seq_ids, x.starts, x.q_lens, None, x.tokens.astype(np.float32)))


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_replies_come_back_in_order_and_errors_keep_the_connection():
    server = ChannelServer(_echo)

    async def go():
        ch = await StepChannel.open(*server.address, server.secret, "shard-0")
        futs = []
        for k in range(50):
            h, b = encode_step(_batch(tokens=np.full((1, 1), k, dtype=np.int64), free=[666] if k == 20 else []))
            futs.append(ch.send(h, b))
        replies = await asyncio.gather(*futs)
        ch.close()
        return replies
    try:
        replies = _run(go())
    finally:
        server.close()
    assert replies[20][0] == {"ok": False, "error": "ValueError: shard 0: boom"}
    got = [int(np.frombuffer(b, np.float32)[0]) for k, (h, b) in enumerate(replies) if k != 20]
    assert got == [k for k in range(50) if k != 20]


def test_a_wrong_secret_is_refused():
    server = ChannelServer(_echo)
    try:
        with pytest.raises(ChannelBroken, match="refused"):
            _run(StepChannel.open(*server.address, "0" * 32, "shard-0"))
    finally:
        server.close()


SLOW_SHARD = """
import sys, time
from shards.runtime.channel import ChannelServer
server = ChannelServer(lambda header, body: time.sleep(60))
print(server.address[1], server.secret, flush=True)
time.sleep(60)
"""


def test_a_shard_process_that_dies_fails_its_pending_steps():
    """The shard's process is killed with two steps pending: both fail with ChannelBroken (not
    a hang), and a later send fails at once."""
    import os
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SHARD], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    async def go():
        port, secret = proc.stdout.readline().split()
        ch = await StepChannel.open("127.0.0.1", int(port), secret, "shard-1")
        futs = [ch.send(*encode_step(_batch())) for _ in range(2)]
        await asyncio.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*futs, return_exceptions=True)
        return results + await asyncio.gather(ch.send(*encode_step(_batch())), return_exceptions=True)
    try:
        results = _run(asyncio.wait_for(go(), 30))
    finally:
        proc.kill()
        proc.wait()
    assert len(results) == 3 and all(isinstance(r, ChannelBroken) for r in results), results


def test_an_oversized_frame_drops_the_connection():
    server = ChannelServer(_echo)
    try:
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(frame({"secret": server.secret}))
            s.recv(64)
            s.sendall(b"\xff\xff\xff\x7f\x00\x00\x00\x00")   # a 2 GiB header
            assert s.recv(64) == b""                           # closed, nothing allocated
    finally:
        server.close()


def _closed(s: socket.socket) -> bool:
    """The shard closed the connection (an empty read or a reset) within the socket's timeout."""
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_before_the_secret_only_a_small_hello_is_read():
    """An unauthenticated peer cannot make the shard read a large header, any body, or wait:
    each of these connections is dropped, and a good one still opens."""
    import shards.runtime.channel as channel
    server = ChannelServer(_echo)
    try:
        for raw in (channel._FRAME.pack(channel.MAX_HELLO + 1, 0),          # a header over 4 KiB
                    channel._FRAME.pack(10, 1) + b'{"secret":' + b"x",      # a body in the hello
                    b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]",               # valid JSON, not an object
                    frame({"secret": "0" * 32})):                          # a wrong secret
            with socket.create_connection(server.address, timeout=10) as s:
                s.sendall(raw)
                assert _closed(s), raw
        assert server.refused == 4
        ch = _run(StepChannel.open(*server.address, server.secret, "shard-0"))
        ch.close()
    finally:
        server.close()


def test_a_silent_peer_is_dropped_after_the_hello_deadline(monkeypatch):
    import shards.runtime.channel as channel
    monkeypatch.setattr(channel, "HELLO_TIMEOUT_S", 0.3)
    server = ChannelServer(_echo)
    try:
        with socket.create_connection(server.address, timeout=10) as s:   # 10 s: far past the deadline
            assert _closed(s)                          # nothing sent: closed at the hello deadline
    finally:
        server.close()


def test_connections_over_the_cap_are_refused(monkeypatch):
    import shards.runtime.channel as channel
    monkeypatch.setattr(channel, "MAX_CONNECTIONS", 2)
    server = ChannelServer(_echo)
    try:
        held = [socket.create_connection(server.address, timeout=10) for _ in range(2)]
        with socket.create_connection(server.address, timeout=10) as third:
            assert _closed(third)                      # closed at accept: the two slots are taken
        for s in held:
            s.close()
        deadline = __import__("time").monotonic() + 10  # the slots come back when their peers leave
        while True:
            try:
                ch = _run(StepChannel.open(*server.address, server.secret, "shard-0"))
                break
            except ChannelBroken:
                assert __import__("time").monotonic() < deadline
        ch.close()
    finally:
        server.close()


def test_fuzzed_frames_never_stop_the_shard():
    """Random bytes, truncated and oversized frames, before and after the secret: the server
    drops those connections and keeps answering a good one; its process RSS stays flat."""
    import psutil
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    server = ChannelServer(_echo)
    loop = asyncio.new_event_loop()                    # the good channel's replies run on it
    good = loop.run_until_complete(StepChannel.open(*server.address, server.secret, "shard-0"))
    rss0, tried = psutil.Process().memory_info().rss, [0]

    async def step():
        return await asyncio.wait_for(good.send(*encode_step(_batch())), 10)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=64), st.booleans())
    def one(junk, authenticated):
        tried[0] += 1
        with socket.create_connection(server.address, timeout=10) as s:
            try:
                if authenticated:
                    s.sendall(frame({"secret": server.secret}))
                    s.recv(64)
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)             # the frame ends there: truncated or complete
                while s.recv(4096):
                    pass
            except OSError:                            # the shard dropped the connection first
                pass
    try:
        one()
        reply, _ = loop.run_until_complete(step())
        rss1 = psutil.Process().memory_info().rss
        print(f"channel fuzz: {tried[0]} connections, RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB, "
              f"{server.refused} refused at the hello")
        assert reply["ok"] and tried[0] >= 100           # hypothesis ran its examples
        assert rss1 - rss0 < 64 << 20                     # nothing a peer sent was kept
    finally:
        good.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        server.close()


def _head(header, body):
    """A stand-in last shard: token ids out = hidden states in + 1000; 'boom' in free raises."""
    if 777 in header["free"]:
        raise ValueError("shard 1: boom")
    x = decode_step(header, body)
    assert x.tokens is None and x.layer == 0
    return encode_reply(Sampled([int(v) + 1000 for v in x.hidden.reshape(-1)]))


async def _chain(servers, router="r1"):
    """A router's channels to the servers, opened last first, each told the next one's address."""
    chans = []
    for k in reversed(range(len(servers))):
        nxt = ({"host": servers[k + 1].address[0], "port": servers[k + 1].address[1],
                "secret": servers[k + 1].secret} if k + 1 < len(servers) else None)
        chans.insert(0, await StepChannel.open(*servers[k].address, servers[k].secret, f"shard-{k}",
                                               router=router, nxt=nxt))
    for c in chans:
        c.on_broken = lambda err: [c.fail(err) for c in chans]
    return chans


def test_steps_go_shard_to_shard_and_replies_come_back_in_order():
    """Shard 0 sends each step's hidden states straight to shard 1, whose tokens come back on the
    router's channel to it, in step order; a failure on either shard comes back in its place
    and the connections stay."""
    servers = [ChannelServer(_echo), ChannelServer(_head)]

    async def go():
        chans = await _chain(servers)
        futs = []
        for k in range(50):
            free = [666] if k == 20 else [777] if k == 30 else []
            chans[0].post(*encode_step(_batch(tokens=np.full((1, 1), k, dtype=np.int64), free=free)))
            futs.append(chans[1].expect())
        replies = await asyncio.gather(*futs)
        for c in chans:
            c.close()
        return replies
    try:
        replies = _run(go())
    finally:
        for s in servers:
            s.close()
    assert replies[20][0] == {"ok": False, "error": "ValueError: shard 0: boom"}
    assert replies[30][0] == {"ok": False, "error": "ValueError: shard 1: boom"}
    got = [h["tokens"][0] for k, (h, _) in enumerate(replies) if k not in (20, 30)]
    assert got == [k + 1000 for k in range(50) if k not in (20, 30)]


def test_a_peer_of_an_unknown_router_or_a_bad_next_address_is_refused():
    """Only a router that opened its own channel to a shard can have steps sent to it by the
    shard before: a connection naming another router is closed at the hello, as is a router's
    whose next shard cannot be reached."""
    servers = [ChannelServer(_echo), ChannelServer(_head)]
    try:
        with socket.create_connection(servers[1].address, timeout=10) as s:
            s.sendall(frame({"secret": servers[1].secret, "peer": "nobody"}))
            assert _closed(s)
        with socket.create_connection(servers[0].address, timeout=10) as s:   # a next shard with no port
            s.sendall(frame({"secret": servers[0].secret, "router": "r3", "next": {"host": "127.0.0.1"}}))
            assert _closed(s)
        assert servers[1].refused == 1 and servers[0].refused == 1
    finally:
        for s in servers:
            s.close()


SHARD = """
import sys, time
import numpy as np
from shards.model.step import Sampled, StepBatch
from shards.runtime.channel import ChannelServer, decode_step, encode_reply
def first(h, b):   # hidden states on to the next shard at once
    x = decode_step(h, b)
    return encode_reply(StepBatch(x.seq_ids, x.starts, x.q_lens, None, x.tokens.astype(np.float32)))
def last(h, b):    # never answers: the steps stay out
    time.sleep(60)
server = ChannelServer(first if sys.argv[1] == "first" else last)
print(server.address[1], server.secret, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("dies", ["first", "last"])
def test_a_dead_shard_fails_the_steps_out(dies):
    """Either shard's process is killed with steps out between them: they fail with ChannelBroken
    (not a hang), and a later step fails at once."""
    import os
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", SHARD, role], stdout=subprocess.PIPE, text=True, cwd=root)
             for role in ("first", "last")]

    async def go():
        where = [dict(zip(("port", "secret"), p.stdout.readline().split()), host="127.0.0.1") for p in procs]
        last = await StepChannel.open("127.0.0.1", int(where[1]["port"]), where[1]["secret"], "shard-1", router="r2")
        chans = [await StepChannel.open("127.0.0.1", int(where[0]["port"]), where[0]["secret"], "shard-0",
                                        router="r2", nxt=where[1]), last]
        for c in chans:
            c.on_broken = lambda err: [c.fail(err) for c in chans]
        futs = []
        for _ in range(2):
            chans[0].post(*encode_step(_batch()))
            futs.append(chans[1].expect())
        await asyncio.sleep(0.2)
        os.kill(procs[0 if dies == "first" else 1].pid, signal.SIGKILL)
        results = await asyncio.gather(*futs, return_exceptions=True)
        chans[0].post(*encode_step(_batch()))
        return results + await asyncio.gather(chans[1].expect(), return_exceptions=True)
    try:
        results = _run(asyncio.wait_for(go(), 30))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert len(results) == 3 and all(isinstance(r, ChannelBroken) for r in results), results
