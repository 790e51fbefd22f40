"""Tier 1: the step channel (shards/runtime/channel.py) without Ray: the wire format, and a server with a
stand-in handler over a real localhost socket."""
import asyncio
import socket

import numpy as np
import pytest
import torch

from shards.model.step import SamplingParams, StepBatch, from_wire
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
                sampling=[SamplingParams(), SamplingParams(0.7, 0.9, 40, 11, 16, ("\n\n", "END"))],
                steps=[0, 5], free=[99], alone=True)
    return StepBatch(**{**base, **kw})


def test_a_step_crosses_the_wire_whole():
    b = _batch()
    header, body = encode_step(b)
    got = decode_step(header, bytearray(body))
    assert (got.seq_ids, got.starts, got.q_lens, got.steps, got.free, got.alone, got.layer) == \
        (b.seq_ids, b.starts, b.q_lens, b.steps, b.free, b.alone, 0)
    assert got.sampling == b.sampling and got.hidden is None
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


def test_last_shard_reply_is_token_ids():
    assert encode_reply([5, 17]) == ({"ok": True, "tokens": [5, 17]}, b"")


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
