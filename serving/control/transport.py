"""How steps reach the shards: the Transport launches one step through every shard and hands
back the future of the last shard's sampled tokens, and holds steps at a boundary while the
Reconfigurer (serving/control/reconfigurer.py) changes the shards.

Steps go by default over a step channel per shard (shards/runtime/channel.py: a TCP socket the
router opens to each actor, ~0.08 ms a round trip against ~2.7 ms for a Ray call): the router
sends a step to shard 0, which sends its hidden states straight on to shard 1, and so on; the
last shard's tokens come back on the router's channel to it. Channels are opened with no step
in flight (the router's loop calls connect) and closed at every change; one that breaks (a dead
actor) fails every step out, like a dead actor's Ray call, and steps go by `.remote` calls until
the router reconnects at its next idle moment (after the dead shard is re-placed).
SHARDSERVE_DIRECT_HOPS=0 has the router pass each shard's hidden states on itself (A/B runs).

With compiled_graph (opt-in), steps go through a Ray Compiled Graph over the shard actors
(shared-memory channels, actor to actor, built at the first step and again after every
change): at concurrency 1 a token's three Ray hops (router -> shard 0 -> shard 1 -> router)
took ~4 ms less than as `.remote` calls (two shard actors chained, w4a8x2, compiled step: 19.7
against 23.1-23.5 ms a token). A shard's exception reaches the router as the step's error and
the graph stays; anything else (a dead actor, a broken channel) drops the graph, and steps go
by `.remote` calls until the next change rebuilds it (re-placing the dead shard is one).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
from collections import deque

from serving.control.shardset import ShardSet, answers, describe
from shards.model.step import Sampled
from shards.runtime.channel import ChannelBroken, StepChannel, StepFailed, encode_step, next_step

CONNECT_TIMEOUT_S = 30.0  # opening channels: every shard hands out its address and secret
# A step out longer than its deadline pings every shard; one that does not answer is hung. The
# deadline follows the steps of its kind: DEADLINE_FACTOR x the slowest of the last LATENCIES
# decode (or prefill) steps, at least DEADLINE_FLOOR_S (a decode step takes tens of ms, a
# prefill chunk up to a second or two on 2 cores), so a hung shard is found in seconds, not at
# a request's timeout. The ping decides, not the deadline: a shard that is only slow answers it
# at once (pings run on Ray's thread, steps on the channel's), so a short deadline costs pings,
# never a healthy shard.
DEADLINE_FLOOR_S = 2.0
DEADLINE_FACTOR = 3.0
LATENCIES = 64
TEARDOWN_S = 30.0         # wait at most this for a graph's teardown before a change
DIRECT_HOPS = os.environ.get("SHARDSERVE_DIRECT_HOPS", "1") != "0"


class ShardLost(RuntimeError):
    """A shard stopped answering while a step was in flight through the graph."""


class Transport:
    def __init__(self, shards: ShardSet, compiled_graph: bool = False, channels: bool = True):
        self.shards = shards
        self.paused = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.on_resume = lambda: None   # the router wakes up on it
        self.compiled_graph = compiled_graph
        self._graph = None              # the Compiled Graph over the shards' handles, once built
        self._graph_ok = compiled_graph   # False after a failure, until the next change
        self.graph_steps = 0            # steps that went through a graph (stats)
        self.channels = channels and not compiled_graph
        self._chans: list[StepChannel] | None = None   # one per handle, once connected
        self._chans_ok = self.channels  # False after a failed connect, until the next change
        self._changes = 0               # changes begun: a connect that overlapped one is dropped
        self.channel_steps = 0          # steps that went over channels (stats)
        # seconds from launch to result, by kind (True: decode steps, False: prefill steps)
        self.latencies: dict[bool, deque[float]] = {True: deque(maxlen=LATENCIES), False: deque(maxlen=LATENCIES)}

    # ---- steps ----------------------------------------------------------------------------
    def launch(self, batch) -> asyncio.Future:
        """Chain one step through every shard, actor to actor; returns the future of the last
        shard's output (call in the router's event loop; steps run in launch order). A step
        that raises here was never sent: it does not count as in flight."""
        fut = self._submit(batch)
        self.inflight += 1
        self._idle.clear()
        return fut

    def _submit(self, batch) -> asyncio.Future:
        if self._chans is not None:
            header, body = encode_step(batch)
            chans = self._chans
            if DIRECT_HOPS and len(chans) > 1:      # on from shard to shard; the last one answers here
                chans[0].post(header, body)         # now: steps reach shard 0 in launch order
                first = chans[-1].expect()
            else:
                first = chans[0].send(header, body)
            self.channel_steps += 1
            return asyncio.ensure_future(self._over_channels(chans, header, first, batch.width == 1))
        graph = self._graph_now()
        if graph is not None:
            self.graph_steps += 1
            return asyncio.ensure_future(self._through(graph, batch, batch.width == 1))
        ref = batch
        for h in self.shards.handles:
            ref = h.forward.remote(ref)
        return asyncio.ensure_future(asyncio.wrap_future(ref.future()))

    @property
    def needs_connect(self) -> bool:
        return self._chans is None and self._chans_ok

    async def connect(self) -> None:
        """Open a step channel to every shard; the router calls it with no step in flight.
        When one cannot be opened, steps go by Ray calls until the next change."""
        changes, chans = self._changes, []
        try:
            where = await asyncio.wait_for(asyncio.gather(*(h.open_channel.remote() for h in self.shards.handles)),
                                           CONNECT_TIMEOUT_S)
            # the last shard first: a shard connects on to the next one, which must know this router
            router = secrets.token_hex(8)
            for k in reversed(range(len(where))):
                w, nxt = where[k], where[k + 1] if DIRECT_HOPS and k + 1 < len(where) else None
                chans.insert(0, await StepChannel.open(w["host"], w["port"], w["secret"], self.shards.names[k],
                                                       router=router, nxt=nxt))
        except Exception as e:
            for c in chans:
                c.close()
            self._chans_ok = False
            self.shards.events.append({"time": time.time(), "action": "channels", "ok": False, "error": describe(e),
                                "note": "steps go by .remote calls until the next change"})
            return
        if changes != self._changes or self.paused or self._chans is not None:   # overtaken
            for c in chans:
                c.close()
            return
        for c in chans:     # a step out is on several channels: one broken fails it on all
            c.on_broken = lambda err, chans=chans: [c.fail(err) for c in chans]
        self._chans = chans

    async def _over_channels(self, chans: list, header: dict, fut: asyncio.Future, decode: bool):
        try:
            return await self._watched(self._relay(chans, header, fut), decode)
        except (ChannelBroken, ShardLost) as e:
            if chans is self._chans:   # the next idle moment reconnects (after a re-place)
                self._close_channels()
            raise ShardLost(str(e)) from e

    async def _relay(self, chans: list, header: dict, fut: asyncio.Future):
        """The last shard's sampled tokens. Without direct hops, each shard's reply on to the
        next: a step reaches shard k + 1 in the order it left shard k, as replies resolve their
        futures in order and each waiter sends on before it awaits again."""
        for k in range(len(chans)):
            reply, body = await fut
            if not reply["ok"]:
                raise StepFailed(reply["error"])
            if "tokens" in reply:
                return Sampled(reply["tokens"], reply.get("logprobs"))
            if DIRECT_HOPS:
                break
            header = next_step(header, reply)
            fut = chans[k + 1].send(header, body)
        raise StepFailed(f"the last shard ({len(chans) - 1}) sent hidden states, not tokens")

    def _close_channels(self) -> None:
        chans, self._chans = self._chans, None
        for c in chans or ():
            c.close()

    @property
    def channels_active(self) -> bool:
        return self._chans is not None

    @property
    def graph_built(self) -> bool:
        """The Compiled Graph exists now (steps go through it)."""
        return self._graph is not None

    @property
    def graph_active(self) -> bool:
        """Steps go through the Compiled Graph now (it is built, or will be at the next step)."""
        return self._graph is not None or self._graph_ok

    def _graph_now(self):
        if self._graph is None and self._graph_ok:
            from ray.dag import InputNode
            try:
                with InputNode() as step:
                    node = step
                    for h in self.shards.handles:
                        node = h.forward.bind(node)
                # asyncio: compiled in the loop that runs it; 4 steps in flight (the router keeps <= 3)
                self._graph = node.experimental_compile(enable_asyncio=True, _max_inflight_executions=4)
            except Exception as e:
                self._graph_failed(e)
        return self._graph

    async def _through(self, graph, batch, decode: bool):
        """One step through the graph (execute_async submits in call order: an asyncio lock)."""
        from ray.exceptions import RayTaskError
        try:
            return await self._watched(await graph.execute_async(batch), decode)
        except RayTaskError:
            raise           # a shard's own exception: the graph still runs
        except Exception as e:
            if graph is self._graph:
                self._graph_failed(e)
            raise

    def deadline_s(self, decode: bool = True) -> float:
        """How long a decode (or prefill) step may be out before the shards are pinged: decode
        steps take tens of ms, a prefill chunk up to seconds, so each kind has its own."""
        return max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * max(self.latencies[decode], default=0.0))

    async def _watched(self, result, decode: bool = True):
        """The step's result. A shard that dies or hangs mid-step leaves it pending for good
        (Ray 2.60, or a stopped process), so a step still out after its deadline pings every
        shard, again each deadline, and raises ShardLost once one does not answer; the event
        says how long the detection took."""
        task, t0 = asyncio.ensure_future(result), time.monotonic()
        while True:
            deadline = self.deadline_s(decode)
            done, _ = await asyncio.wait({task}, timeout=deadline)
            if done:
                self.latencies[decode].append(time.monotonic() - t0)
                return task.result()
            lost = await self.dead()
            if lost:
                task.cancel()
                detect = time.monotonic() - t0
                self.shards.events.append({"time": time.time(), "action": "hung", "shards": lost, "ok": False,
                                           "detect_s": round(detect, 2), "deadline_s": round(deadline, 2)})
                raise ShardLost(f"shard(s) {lost} did not answer a ping after a step was out {detect:.1f} s "
                                f"(deadline {deadline:.1f} s)")

    def _graph_failed(self, err: Exception) -> None:
        self.shards.events.append({"time": time.time(), "action": "graph", "ok": False,
                            "error": describe(err), "note": "steps go by .remote calls until the next change"})
        self._graph_ok = False
        self._drop_graph()

    def _drop_graph(self) -> threading.Thread | None:
        """Tear the graph down on a thread (with a dead actor it waits on it; the router's loop
        must not); returns the thread, None when there was no graph."""
        graph, self._graph = self._graph, None
        if graph is None:
            return None
        t = threading.Thread(target=_teardown, args=(graph,), name="graph-teardown", daemon=True)
        t.start()
        return t

    def close(self, wait: bool = False) -> None:
        """Stop the graph's loops on the actors (they stay up, for plain calls or another router;
        a graph left running would keep them polling its channels and block the next one)."""
        self._graph_ok = self._chans_ok = False
        self._close_channels()
        t = self._drop_graph()
        if wait and t is not None:
            t.join(TEARDOWN_S)

    def landed(self) -> None:
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()

    async def pause(self) -> None:
        """Stop new steps and wait until none is in flight (a step boundary)."""
        self.paused = True
        await self._idle.wait()

    async def drained(self) -> None:
        """Wait until no step is in flight (without stopping new ones: the caller holds them)."""
        await self._idle.wait()

    def resume(self) -> None:
        self.paused = False
        self.on_resume()

    @contextlib.asynccontextmanager
    async def boundary(self):
        """A step boundary for the body: no step in flight, none launched until it ends."""
        await self.pause()
        self._changes += 1
        self._close_channels()   # a change may replace handles: the router reconnects after it
        t = self._drop_graph()   # and the graph is rebuilt after it
        if t is not None:        # an actor runs one graph at a time: the old one must be gone
            await asyncio.to_thread(t.join, TEARDOWN_S)
        try:
            yield
        finally:
            self._graph_ok, self._chans_ok = self.compiled_graph, self.channels
            self.resume()

    async def dead(self) -> list[int]:
        """Shards whose actor is dead or does not answer."""
        ok = await asyncio.gather(*(answers(h) for h in self.shards.handles))
        return [k for k, a in enumerate(ok) if not a]


def _teardown(graph) -> None:
    try:
        graph.teardown()
    except Exception:   # a dead actor's loop cannot be cancelled: nothing is left to stop
        pass
