"""The step channel: steps from the router to each shard over a TCP socket of its own, beside Ray.

A Ray actor call costs ~2.7 ms a round trip on this machine kind (2 cores, Ray 2.60); the same
2.3 KB hidden state over a plain socket takes ~0.08 ms, and a decode token at concurrency 1
crosses two such hops. Ray still starts, places, watches and changes the shards; only steps
take this path (serving/control/pipeline.py falls back to Ray calls when a channel cannot be opened).

A frame is `<II` (header bytes, body bytes), a JSON header, then the body: a step's token ids or
hidden states as raw array bytes. No pickle: a frame can name numbers and arrays, never code.
A connection's first frame must carry the shard's secret, which only a Ray call (token-
authenticated) hands out; until it does, the shard reads at most a 4 KiB hello within 5 s and
keeps at most 16 connections open. A shard answers a connection's frames one at a time, in order.

Steps go shard to shard. A router's hello names itself (`router`, an id) and, to every shard
but the last, the next shard (`next`: its host, port and secret). Such a shard opens a
connection of its own to the next one (hello `peer`: the router's id) and sends each step's
hidden states on over it; the last shard writes its reply to that router's own connection. So
a step crosses one socket per shard and a reply one, and the router's loop is not between two
shards: at concurrency 1 it is busy with the previous token's text while the first shard steps.
A shard's failure goes on down the chain as `passed` (not computed again), so replies reach the
router in step order, errors included. A shard whose next one is gone closes the router's
connection: the router fails every step out and reconnects after the change that follows.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
import socket
import struct
import threading
from collections import deque

import numpy as np
import torch

from shards.model.step import Sampled, SamplingParams, StepBatch

_FRAME = struct.Struct("<II")
MAX_HEADER = 16 << 20     # bytes: a header holds ids and sampling of at most a few thousand rows
MAX_BODY = 2 << 30        # bytes: the largest prefill chunk's hidden states are far below this
# before the secret is checked a connection may send one small frame (the hello), within a
# deadline: an unauthenticated peer can make the shard allocate or wait for no more than this
MAX_HELLO = 4 << 10       # bytes of the hello's header; its body must be empty
HELLO_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16      # open connections per shard (a router opens one, the shard before it one per router)
_DTYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16}


class ChannelBroken(ConnectionError):
    """The connection to a shard closed or failed: its process is gone or unreachable."""


class StepFailed(RuntimeError):
    """The shard raised while running the step; the message is its exception's type and text."""


# ---- the wire format (pure) -------------------------------------------------------------------
def encode_step(batch: StepBatch) -> tuple[dict, bytes]:
    """A first-stage step (token ids) as (header, body)."""
    header = {"seq_ids": batch.seq_ids, "starts": batch.starts, "q_lens": batch.q_lens, "steps": batch.steps,
              "free": batch.free, "pins": [list(c) for c in batch.pins], "copies": [list(c) for c in batch.copies],
              "alone": batch.alone, "layer": batch.layer, "targets": batch.targets,
              "masks": [None if m is None else base64.b64encode(np.ascontiguousarray(m, np.int32)).decode()
                        for m in batch.masks],
              "sampling": [[p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens, list(p.stop), p.logprobs,
                            p.prompt_logprobs] for p in batch.sampling]}
    meta, body = encode_array(batch.tokens if batch.tokens is not None else batch.hidden)
    header.update(meta, array="tokens" if batch.tokens is not None else "hidden")
    return header, body


def decode_step(header: dict, body) -> StepBatch:
    """encode_step's inverse (the array is a writable view of body when body is a bytearray)."""
    sampling = [SamplingParams(t, p, k, seed, n, tuple(stop), lp, plp)
                for t, p, k, seed, n, stop, lp, plp in header["sampling"]]
    x = decode_array(header, body)
    tokens, hidden = (x, None) if header["array"] == "tokens" else (None, x)
    return StepBatch(header["seq_ids"], header["starts"], header["q_lens"], tokens, hidden, sampling,
                     header["steps"], header["free"], header["pins"], header["copies"], header["alone"],
                     header["targets"], [None if m is None else np.frombuffer(base64.b64decode(m), np.int32)
                                         for m in header["masks"]], header["layer"])


def encode_array(x) -> tuple[dict, bytes]:
    """A numpy array or CPU tensor as ({dtype, shape}, raw bytes); bf16 travels as its bits."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return {"dtype": "bfloat16", "shape": list(x.shape)}, x.contiguous().view(torch.int16).numpy().tobytes()
        x = x.numpy()
    x = np.ascontiguousarray(x)
    if x.dtype.name not in _DTYPES:
        raise TypeError(f"a step array must be one of {sorted(_DTYPES)} or bfloat16, not {x.dtype}")
    return {"dtype": x.dtype.name, "shape": list(x.shape)}, x.tobytes()


def decode_array(meta: dict, body):
    shape = tuple(meta["shape"])
    if meta["dtype"] == "bfloat16":
        return torch.frombuffer(body, dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return np.frombuffer(body, dtype=_DTYPES[meta["dtype"]]).reshape(shape)


def encode_reply(out) -> tuple[dict, bytes]:
    """A shard's forward result: sampled token ids and log probabilities (last shard) or the
    step for the next one."""
    if isinstance(out, Sampled):
        return {"ok": True, "tokens": out.tokens, "logprobs": out.logprobs}, b""
    meta, body = encode_array(out.hidden)
    return {"ok": True, "layer": out.layer, **meta}, body


def next_step(header: dict, reply: dict) -> dict:
    """The header of the same step for the next shard: its hidden states are reply's array."""
    return {**header, "array": "hidden", "dtype": reply["dtype"], "shape": reply["shape"], "layer": reply["layer"]}


def frame(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(len(h), len(body)) + h + body


def _sizes(prefix: bytes) -> tuple[int, int]:
    nh, nb = _FRAME.unpack(prefix)
    if nh > MAX_HEADER or nb > MAX_BODY:
        raise ChannelBroken(f"frame of {nh} header + {nb} body bytes is over the limits ({MAX_HEADER}, {MAX_BODY})")
    return nh, nb


# ---- the shard's side: a thread per connection ---------------------------------------------------
class _Route:
    """A router's connection to this shard (replies go back on it, one writer at a time) and the
    next shard's address, when there is one."""

    def __init__(self, conn: socket.socket, nxt: dict | None):
        self.conn, self.next, self.lock = conn, nxt, threading.Lock()

    def reply(self, header: dict, body: bytes = b"") -> None:
        with self.lock:
            self.conn.sendall(frame(header, body))


class ChannelServer:
    """Listens on (host, port 0); runs handle(header, body) -> (header, body) for each frame of an
    authenticated connection, on that connection's thread, and sends the result on to the next
    shard or back to the router. An exception in handle becomes {"ok": false, "error": "<type>:
    <text>"}; the connection stays."""

    def __init__(self, handle, host: str = "127.0.0.1"):
        self.handle = handle
        self.secret = secrets.token_hex(16)
        self.sock = socket.create_server((host, 0))
        self.address = (host, self.sock.getsockname()[1])
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._routes: dict[str, _Route] = {}   # by router id, while its connection is open
        self._routes_lock = threading.Lock()
        self.refused = 0          # connections dropped before or at the hello (stats, tests)
        threading.Thread(target=self._accept, name="step-channel", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:   # closed
                return
            if not self._slots.acquire(blocking=False):   # over the cap: closed at once
                self.refused += 1
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="step-channel-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                hello = self._hello(conn)
                if hello is None or not self._connected(conn, hello):
                    self.refused += 1
        finally:
            self._slots.release()

    def _hello(self, conn: socket.socket) -> dict | None:
        """The first frame, read under a deadline and a size cap before anything else: the
        secret, compared in constant time."""
        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            nh, nb = _FRAME.unpack(_recv(conn, _FRAME.size))
            if nh > MAX_HELLO or nb:
                return None
            hello = json.loads(_recv(conn, nh))
            ok = isinstance(hello, dict) and hmac.compare_digest(str(hello.get("secret", "")), self.secret)
            return hello if ok else None
        except (OSError, ChannelBroken, ValueError):   # timeout, peer gone, not JSON
            return None

    def _connected(self, conn: socket.socket, hello: dict) -> bool:
        """A router's connection (its replies' route, registered while it is open) or an earlier
        shard's for that router's steps. Answered once the connection to the next shard is open,
        so a router's connect fails, not its first step; False when refused."""
        peer = hello.get("peer")
        if peer is not None:
            route = self._routes.get(str(peer))
            return route is not None and self._run(conn, route, str(peer))
        key, route = str(hello.get("router", id(conn))), _Route(conn, hello.get("next"))
        with self._routes_lock:
            self._routes[key] = route
        try:
            return self._run(conn, route, key)
        finally:
            with self._routes_lock:
                if self._routes.get(key) is route:
                    del self._routes[key]

    def _run(self, conn: socket.socket, route: _Route, router: str) -> bool:
        try:
            downstream = _open_peer(route.next, router) if route.next else None
        except (OSError, KeyError, TypeError, ValueError):   # unreachable, or a malformed address
            return False
        try:
            conn.sendall(frame({"ok": True}))
            conn.settimeout(None)      # steps come when the router has them
            self._steps(conn, route, downstream)
        except OSError:
            pass
        finally:
            if downstream is not None:
                downstream.close()
        return True

    def _steps(self, conn: socket.socket, route: _Route, downstream: socket.socket | None) -> None:
        """Frames of an authenticated connection, in order, until it closes: each step's hidden
        states on to the next shard, anything else (tokens, a failure) back to the router."""
        try:
            while True:
                header, body = _read_frame(conn)
                if "passed" in header:     # an earlier shard's failure, on its way to the router
                    reply, out = header["passed"], b""
                else:
                    try:
                        reply, out = self.handle(header, body)
                    except Exception as e:   # the step's own failure: the router recomputes its group
                        reply, out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}, b""
                if downstream is None:
                    route.reply(reply, out)
                elif reply.get("ok") and "tokens" not in reply:
                    downstream.sendall(frame(next_step(header, reply), out))
                else:
                    downstream.sendall(frame({"passed": reply}))
        except (OSError, ChannelBroken, ValueError):   # peer gone, or a malformed frame: drop it
            return

    def close(self) -> None:
        self.sock.close()


def _open_peer(where: dict, router) -> socket.socket:
    """A connection to the next shard for one router's steps (its hello: that shard's secret and
    the router's id)."""
    s = socket.create_connection((where["host"], int(where["port"])), timeout=HELLO_TIMEOUT_S)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(frame({"secret": str(where["secret"]), "peer": router}))
        nh, nb = _sizes(_recv(s, _FRAME.size))
        if not json.loads(_recv(s, nh)).get("ok") or nb:
            raise ConnectionRefusedError(f"shard at {where['host']}:{where['port']} refused the step connection")
        s.settimeout(None)
        return s
    except (ChannelBroken, ValueError) as e:
        s.close()
        raise ConnectionRefusedError(str(e)) from None
    except OSError:
        s.close()
        raise


def _read_frame(conn: socket.socket) -> tuple[dict, bytearray]:
    nh, nb = _sizes(_recv(conn, _FRAME.size))
    header = json.loads(_recv(conn, nh))
    return header, _recv(conn, nb)


def _recv(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise ChannelBroken("connection closed")
        got += k
    return buf


# ---- the router's side: asyncio ------------------------------------------------------------------
class StepChannel:
    """One connection to one shard; the shard answers its frames in the order they were sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str):
        self.reader, self.writer, self.name = reader, writer, name
        self.pending: deque[asyncio.Future] = deque()
        self.broken: ChannelBroken | None = None
        self.on_broken = lambda err: None    # called once when the connection fails
        self._task = asyncio.get_running_loop().create_task(self._replies())

    @classmethod
    async def open(cls, host: str, port: int, secret: str, name: str, timeout: float = 10.0,
                   router: str | None = None, nxt: dict | None = None) -> "StepChannel":
        """router: this router's id, where replies of steps that came through earlier shards go;
        nxt: the next shard's {host, port, secret}, which this one sends its steps on to."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = {"secret": secret} | ({"router": router} if router else {}) | ({"next": nxt} if nxt else {})
        writer.write(frame(hello))
        try:
            hello, _ = await asyncio.wait_for(_read_async(reader), timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            writer.close()
            raise ChannelBroken(f"{name} refused the channel (wrong secret?): {e}") from None
        if not hello.get("ok"):
            writer.close()
            raise ChannelBroken(f"{name} refused the channel: {hello}")
        return cls(reader, writer, name)

    def send(self, header: dict, body: bytes = b"") -> asyncio.Future:
        """Write one frame now; the future gets its reply (header, body). Nothing awaits between
        the write and the queueing of the future, so frames leave in call order; the transport
        buffers a large one (at most a few steps are in flight)."""
        fut = asyncio.get_running_loop().create_future()
        if self.broken:
            fut.set_exception(self.broken)
            return fut
        self.writer.write(frame(header, body))
        self.pending.append(fut)
        return fut

    def post(self, header: dict, body: bytes = b"") -> None:
        """Write one frame whose reply comes back on another channel (the last shard's; when this
        one is broken, so is that one: Transport joins their failures)."""
        if not self.broken:
            self.writer.write(frame(header, body))

    def expect(self) -> asyncio.Future:
        """The future of the next reply in order, for a step sent to an earlier shard."""
        fut = asyncio.get_running_loop().create_future()
        if self.broken:
            fut.set_exception(self.broken)
        else:
            self.pending.append(fut)
        return fut

    async def _replies(self) -> None:
        try:
            while True:
                reply = await _read_async(self.reader)
                fut = self.pending.popleft()
                if not fut.done():   # its step was given up on (a lost shard)
                    fut.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError, ValueError) as e:
            self.fail(ChannelBroken(f"{self.name}: channel closed ({type(e).__name__}: {e})"))
        except asyncio.CancelledError:
            self.fail(ChannelBroken(f"{self.name}: channel closed by the router"))
            raise

    def fail(self, err: ChannelBroken) -> None:
        """Fail every step out on this channel and any sent later."""
        first = self.broken is None
        self.broken = self.broken or err
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(err)
        if first:
            self.on_broken(err)

    def close(self) -> None:
        try:
            self._task.cancel()
            self.writer.close()
        except RuntimeError:   # its loop already closed (a replica shutting down): nothing to stop
            pass


async def _read_async(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    nh, nb = _sizes(await reader.readexactly(_FRAME.size))
    header = json.loads(await reader.readexactly(nh))
    return header, await reader.readexactly(nb) if nb else b""
