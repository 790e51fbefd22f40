"""The Pipeline: the shard actors, their plan, and every change to them (docs/controller.md).

The router (serving/router/engine.py) only launches steps through `launch` and reports them back with
`landed`; everything that changes the shards (move layers, split a shard, recompress one,
replace a dead one) runs here between `pause` and `resume`, at a step boundary: no step is in
flight, so no KV is half-written while it moves. Every change is recorded in `events`.

Steps go by default over a step channel per shard (shards/runtime/channel.py: a TCP socket the router
opens to each actor, ~0.08 ms a round trip against ~2.7 ms for a Ray call here): the router sends
a step to shard 0, passes its hidden states on to shard 1, and so on. Channels are opened with no
step in flight (the router's loop calls connect) and closed at every change; a broken one
(a dead actor) fails its steps like a dead actor's Ray call, and steps go by `.remote` calls
until the router reconnects at its next idle moment (after the dead shard is re-placed).

With compiled_graph (opt-in), steps go through a Ray Compiled Graph over the shard actors
(shared-memory channels, actor to actor, built at the first step and again after every
change): at concurrency 1 a token's three
Ray hops (router -> shard 0 -> shard 1 -> router) took ~4 ms less than as `.remote` calls
(two shard actors chained, w4a8x2, compiled step: 19.7 against 23.1-23.5 ms a token). A
shard's exception reaches the router as the step's error and the graph stays; anything else
(a dead actor, a broken channel) drops the graph, and steps go by `.remote` calls until the
next change rebuilds it (re-placing the dead shard is one).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections import deque

from shards.plan.layer_range import LayerRange
from shards.plan.plan import Action, MoveLayers, Plan, Recompress, ReplaceShard, ShardSpec, SplitShard
from shards.runtime.channel import ChannelBroken, StepChannel, StepFailed, encode_step, next_step

PING_TIMEOUT_S = 30.0     # a paused pipeline has nothing queued: a live actor answers at once
NAME_RELEASE_S = 20.0     # how long a dead actor's name may stay registered
WATCH_S = 2.0             # a graph step out this long checks that every shard still answers
TEARDOWN_S = 30.0         # wait at most this for a graph's teardown before a change


class ShardLost(RuntimeError):
    """A shard stopped answering while a step was in flight through the graph."""


class ActionError(RuntimeError):
    """An action could not be carried out; the pipeline was rolled back to where it was.
    `event` is its entry in Pipeline.events."""

    def __init__(self, message: str, event: dict):
        super().__init__(message)
        self.event = event


def describe(err: BaseException) -> str:
    """One line for an error from a shard: a RayTaskError's own first line is only the task's
    name, the shard's exception is its cause."""
    if isinstance(err, StepFailed):   # the shard's own type and text, already
        return str(err)[:300]
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


async def _answers(handle) -> bool:
    """Whether a shard actor is alive and answering (a paused pipeline has nothing queued)."""
    try:
        await asyncio.wait_for(handle.ping.remote(), PING_TIMEOUT_S)
        return True
    except Exception:   # ActorDiedError, unreachable node, timeout: all mean re-place
        return False


class Pipeline:
    def __init__(self, model: str, plan: Plan, handles: list, kv_blocks: int, block_size: int,
                 prefix: str = "", compiled_graph: bool = False, channels: bool = True):
        self.model, self.plan, self.handles = model, plan, list(handles)
        self.names = [f"{prefix}shard-{s.index}" for s in plan.shards]
        self.kv_blocks, self.block_size, self.prefix = kv_blocks, block_size, prefix
        self.events: deque[dict] = deque(maxlen=256)
        self.paused = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()     # one change at a time
        self.on_resume = lambda: None   # the router wakes up on it
        self.compiled_graph = compiled_graph
        self._graph = None              # the Compiled Graph over self.handles, once built
        self._graph_ok = compiled_graph   # False after a failure, until the next change
        self.graph_steps = 0            # steps that went through a graph (stats)
        self.channels = channels and not compiled_graph
        self._chans: list[StepChannel] | None = None   # one per handle, once connected
        self._chans_ok = self.channels  # False after a failed connect, until the next change
        self._changes = 0               # changes begun: a connect that overlapped one is dropped
        self.channel_steps = 0          # steps that went over channels (stats)

    # ---- steps ----------------------------------------------------------------------------
    def launch(self, batch) -> asyncio.Future:
        """Chain one step through every shard, actor to actor; returns the future of the last
        shard's output (call in the router's event loop; steps run in launch order)."""
        self.inflight += 1
        self._idle.clear()
        if self._chans is not None:
            self.channel_steps += 1
            header, body = encode_step(batch)
            first = self._chans[0].send(header, body)   # now: steps reach shard 0 in launch order
            return asyncio.ensure_future(self._over_channels(self._chans, header, first))
        graph = self._graph_now()
        if graph is not None:
            self.graph_steps += 1
            return asyncio.ensure_future(self._through(graph, batch))
        ref = batch
        for h in self.handles:
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
            where = await asyncio.wait_for(asyncio.gather(*(h.open_channel.remote() for h in self.handles)),
                                           PING_TIMEOUT_S)
            for w, name in zip(where, self.names):
                chans.append(await StepChannel.open(w["host"], w["port"], w["secret"], name))
        except Exception as e:
            for c in chans:
                c.close()
            self._chans_ok = False
            self.events.append({"time": time.time(), "action": "channels", "ok": False, "error": describe(e),
                                "note": "steps go by .remote calls until the next change"})
            return
        if changes != self._changes or self.paused or self._chans is not None:   # overtaken
            for c in chans:
                c.close()
            return
        self._chans = chans

    async def _over_channels(self, chans: list, header: dict, fut: asyncio.Future):
        try:
            return await self._watched(self._relay(chans, header, fut))
        except (ChannelBroken, ShardLost) as e:
            if chans is self._chans:   # the next idle moment reconnects (after a re-place)
                self._close_channels()
            raise ShardLost(str(e)) from e

    async def _relay(self, chans: list, header: dict, fut: asyncio.Future):
        """Each shard's reply on to the next; the last one's sampled tokens. A step reaches shard
        k + 1 in the order it left shard k: replies resolve their futures in order, and each
        waiter sends on before it awaits again."""
        for k in range(len(chans)):
            reply, body = await fut
            if not reply["ok"]:
                raise StepFailed(reply["error"])
            if "tokens" in reply:
                return reply["tokens"]
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
    def graph_active(self) -> bool:
        """Steps go through the Compiled Graph now (it is built, or will be at the next step)."""
        return self._graph is not None or self._graph_ok

    def _graph_now(self):
        if self._graph is None and self._graph_ok:
            from ray.dag import InputNode
            try:
                with InputNode() as step:
                    node = step
                    for h in self.handles:
                        node = h.forward.bind(node)
                # asyncio: compiled in the loop that runs it; 4 steps in flight (the router keeps <= 3)
                self._graph = node.experimental_compile(enable_asyncio=True, _max_inflight_executions=4)
            except Exception as e:
                self._graph_failed(e)
        return self._graph

    async def _through(self, graph, batch):
        """One step through the graph (execute_async submits in call order: an asyncio lock)."""
        from ray.exceptions import RayTaskError
        try:
            return await self._watched(await graph.execute_async(batch))
        except RayTaskError:
            raise           # a shard's own exception: the graph still runs
        except Exception as e:
            if graph is self._graph:
                self._graph_failed(e)
            raise

    async def _watched(self, result):
        """The graph's result. A shard that dies mid-step leaves it pending for good (Ray 2.60),
        so a step still out after WATCH_S checks the shards every WATCH_S and raises once one
        does not answer (a decode step takes tens of ms, a prefill chunk under a second here)."""
        task = asyncio.ensure_future(result)
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_S)
            if done:
                return task.result()
            lost = await self.dead()
            if lost:
                task.cancel()
                raise ShardLost(f"shard(s) {lost} stopped answering with a step in flight")

    def _graph_failed(self, err: Exception) -> None:
        self.events.append({"time": time.time(), "action": "graph", "ok": False,
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
    async def _paused(self):
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

    # ---- reading --------------------------------------------------------------------------
    async def stats(self) -> list[dict]:
        return list(await asyncio.gather(*(h.stats.remote() for h in self.handles)))

    async def stats_or_errors(self, timeout: float = 10.0) -> list[dict]:
        """Each shard's stats, or {"error": ...} for one that is dead or slow (being re-placed)."""
        async def one(h) -> dict:
            try:
                return await asyncio.wait_for(h.stats.remote(), timeout)
            except Exception as e:
                return {"error": describe(e)}
        return list(await asyncio.gather(*(one(h) for h in self.handles)))

    async def dead(self) -> list[int]:
        """Shards whose actor is dead or does not answer."""
        ok = await asyncio.gather(*(_answers(h) for h in self.handles))
        return [k for k, a in enumerate(ok) if not a]

    async def set_budget(self, k: int, budget_bytes: int | None) -> dict:
        self._check_index(k)
        st = await self.handles[k].set_budget.remote(budget_bytes)
        self._set_spec(k, budget_bytes=budget_bytes)
        return st

    # ---- changes --------------------------------------------------------------------------
    async def apply(self, action: Action) -> dict:
        """Carry out one action at a step boundary; returns its event. Raises ActionError
        (after rolling back) when it cannot be done."""
        kind = {MoveLayers: "move", Recompress: "recompress", SplitShard: "split",
                ReplaceShard: "restart"}[type(action)]
        shard = action.src if isinstance(action, MoveLayers) else action.shard
        async with self._lock:
            if isinstance(action, ReplaceShard) and await _answers(self.handles[action.shard]):
                # already re-placed (the router and the controller both saw it die)
                return {"action": kind, "shard": shard, "ok": True, "skipped": "it answers"}
            before, t0 = self._shape(), time.time()
            event = {"time": t0, "action": kind, "shard": shard, "name": self.names[shard],
                     "reason": action.reason, "before": before}
            try:
                await getattr(self, "_" + kind)(action)
            except Exception as e:
                event.update(ok=False, error=f"{type(e).__name__}: {e}", after=self._shape(),
                             seconds=time.time() - t0)
                self.events.append(event)
                raise ActionError(f"{kind} of shard {shard} failed: {e}", event) from e
            event.update(ok=True, after=self._shape(), seconds=time.time() - t0)
            self.events.append(event)
            return event

    async def _move(self, a: MoveLayers) -> None:
        if abs(a.src - a.dst) != 1:
            raise ValueError(f"layers move between neighbours only, not shard {a.src} -> {a.dst}")
        src, dst = self.handles[a.src], self.handles[a.dst]
        async with self._paused():
            handoff = src.shrink.remote(a.layers)   # K/V go actor to actor, not via here
            try:
                await dst.grow.remote(a.layers, handoff)
            except Exception:
                await src.grow.remote(a.layers, handoff)   # the layers go back where they were
                raise
            await self._refresh()

    async def _recompress(self, a: Recompress) -> None:
        async with self._paused():
            await self.handles[a.shard].recompress.remote(a.compression)
            await self._refresh()

    async def _split(self, a: SplitShard) -> None:
        """The new actor loads its layers while the pipeline keeps serving; only the KV handoff
        happens paused. A shard that ends the model gives its lower half (it keeps lm_head),
        any other its upper half (the first keeps the embedding)."""
        k, spec, n = a.shard, self.plan.shards[a.shard], self.plan.n_layers
        if len(spec.layers) < 2 or (spec.layers.is_first() and spec.layers.is_last(n)):
            raise ValueError(f"shard {k} with layers {spec.layers} cannot be split "
                             "(one layer, or it holds both ends of the model)")
        mid = spec.layers.start + len(spec.layers) // 2
        upper = not spec.layers.is_last(n)
        lo, hi = LayerRange(spec.layers.start, mid), LayerRange(mid, spec.layers.end)
        part, keep, at = (hi, lo, k + 1) if upper else (lo, hi, k)
        new_spec = dataclasses.replace(spec, layers=part, budget_bytes=None)
        specs = list(self.plan.shards)
        specs[k] = dataclasses.replace(spec, layers=keep)
        specs.insert(at, new_spec)
        plan = dataclasses.replace(self.plan, shards=tuple(   # validated before anything changes
            dataclasses.replace(s, index=i) for i, s in enumerate(specs)))
        name = self._fresh_name()
        new = self._start(new_spec, name, len(self.handles) + 1)
        try:
            await new.ready.remote()
            async with self._paused():
                handoff = self.handles[k].shrink.remote(part)
                try:
                    await new.adopt.remote(handoff)
                except Exception:
                    await self.handles[k].grow.remote(part, handoff)
                    raise
                self.handles.insert(at, new)
                self.names.insert(at, name)
                self.plan = plan
                await self._refresh()
        except Exception:
            if new not in self.handles:
                _kill(new)
            raise

    async def _restart(self, a: ReplaceShard) -> None:
        """Re-place shard k with its current layers, compression and budget, under its name.
        The new actor holds no KV: the router recomputes every live sequence (Engine.apply)."""
        import ray
        k, name, spec = a.shard, self.names[a.shard], self.plan.shards[a.shard]
        async with self._paused():
            _kill(self.handles[k])
            deadline = time.time() + NAME_RELEASE_S
            while time.time() < deadline:     # a killed actor's name is released asynchronously
                try:
                    ray.get_actor(name, namespace="shardserve")
                except ValueError:
                    break
                await asyncio.sleep(0.1)
            handle = self._start(spec, name, len(self.handles))
            try:
                await handle.ready.remote()
                if spec.budget_bytes is not None:
                    await handle.set_budget.remote(spec.budget_bytes)
            except Exception:
                _kill(handle)
                raise
            self.handles[k] = handle
            await self._refresh()

    # ---- helpers --------------------------------------------------------------------------
    def _start(self, spec: ShardSpec, name: str, n_shards: int):
        from shards.runtime.actor import start_shard
        threads = max(1, (os.cpu_count() or 1) // n_shards)
        return start_shard(self.model, spec, self.kv_blocks, self.block_size, name, threads, attach=False)

    def _fresh_name(self) -> str:
        used = {int(n.rsplit("-", 1)[1]) for n in self.names}
        return f"{self.prefix}shard-{max(used) + 1}"

    async def _refresh(self) -> None:
        """Plan ranges and bytes from what the shards now report."""
        stats = await self.stats()
        self.plan = dataclasses.replace(self.plan, shards=tuple(
            dataclasses.replace(s, layers=LayerRange(st["start"], st["end"]), weight_bytes=st["weight_bytes"],
                                compression=st["compression"])
            for s, st in zip(self.plan.shards, stats)))

    def _set_spec(self, k: int, **changes) -> None:
        shards = list(self.plan.shards)
        shards[k] = dataclasses.replace(shards[k], **changes)
        self.plan = dataclasses.replace(self.plan, shards=tuple(shards))

    def _shape(self) -> list[dict]:
        return [{"shard": s.index, "name": n, "start": s.layers.start, "end": s.layers.end,
                 "compression": s.compression, "weight_bytes": s.weight_bytes, "budget_bytes": s.budget_bytes}
                for s, n in zip(self.plan.shards, self.names)]

    def _check_index(self, k: int) -> None:
        if not 0 <= k < len(self.handles):
            raise IndexError(f"no shard {k}: the pipeline has shards 0..{len(self.handles) - 1}")


def _kill(handle) -> None:
    import ray
    try:
        ray.kill(handle)
    except Exception:   # already gone
        pass


def _teardown(graph) -> None:
    try:
        graph.teardown()
    except Exception:   # a dead actor's loop cannot be cancelled: nothing is left to stop
        pass
