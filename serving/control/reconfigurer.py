"""Every change to a live pipeline's shards: move layers between neighbours, split a shard onto
a new actor, recompress one, re-place a dead one (docs/controller.md). Each runs at a step
boundary the Transport holds (no step in flight, so no KV is half-written while it moves), is
recorded in the ShardSet's events, and is rolled back when it fails (ActionError).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

from serving.config import ControllerConfig
from serving.control.policy import Snapshot, least_bytes, reading, shed
from serving.control.shardset import ShardSet, answers, describe
from serving.control.transport import Transport
from shards.errors import ShardServeError
from shards.plan.layer_range import LayerRange
from shards.plan.plan import Action, MoveLayers, Recompress, ReplaceShard, ShardSpec, SplitShard
from shards.runtime.stats import ShardStats

MiB = 1 << 20
NAME_RELEASE_S = 20.0     # how long a dead actor's name may stay registered
ANSWER_S = 10.0           # a budget change waits this long for its shard, holding the change lock
RESTART_TRIES = 3         # re-placements of one dead shard before the pipeline is down


class ActionError(RuntimeError):
    """An action could not be carried out; the pipeline was rolled back to where it was.
    `event` is its entry in the ShardSet's events."""

    def __init__(self, message: str, event: dict):
        super().__init__(message)
        self.event = event


class BudgetTooSmall(ShardServeError, ValueError):
    """A budget the shard's layers cannot fit at the most compressed spec allowed."""


class ShardUnanswered(ShardServeError):
    """A shard did not answer a budget change within ANSWER_S (hung, or being re-placed)."""


class Reconfigurer:
    def __init__(self, shards: ShardSet, transport: Transport, controller: ControllerConfig | None = None):
        """controller: the controller's settings with its measured ladder (None: no controller,
        so nothing will be recompressed)."""
        self.shards, self.transport, self.controller = shards, transport, controller
        self._lock = asyncio.Lock()     # one change at a time
        self._placed_at: dict[str, float] = {}   # actor name -> when it was last re-placed

    # ---- reading --------------------------------------------------------------------------
    async def stats(self) -> list[ShardStats]:
        return list(await asyncio.gather(*(h.stats.remote() for h in self.shards.handles)))

    async def stats_or_errors(self, timeout: float = 10.0) -> list[ShardStats | str]:
        """Each shard's stats, or why not (a line) for one that is dead or slow (being re-placed)."""
        async def one(h) -> ShardStats | str:
            try:
                return await asyncio.wait_for(h.stats.remote(), timeout)
            except Exception as e:
                return describe(e)
        return list(await asyncio.gather(*(one(h) for h in self.shards.handles)))

    async def set_budget(self, shard: int | str, budget_bytes: int | None) -> ShardStats:
        """Shard `shard` (its index, or its actor name, which a split does not shift) may hold
        budget_bytes. Under the change lock: a budget never lands in the middle of a move or
        a split, nor gets lost in the plan a split writes."""
        async with self._lock:
            k = self.index(shard)
            if budget_bytes is not None:
                await self._check_budget(k, budget_bytes)
            st = await self._answer(k, self.shards.handles[k].set_budget.remote(budget_bytes))
            self._set_spec(k, budget_bytes=budget_bytes)
            return st

    async def _answer(self, k: int, call):
        """A shard call's result, or ShardUnanswered after ANSWER_S: a hung shard must not hold
        the change lock that its own re-placement needs."""
        try:
            return await asyncio.wait_for(call, ANSWER_S)
        except asyncio.TimeoutError:
            raise ShardUnanswered(f"shard {k} ({self.shards.names[k]}) did not answer in {ANSWER_S:.0f} s; "
                                  "try again once it is re-placed") from None

    async def _check_budget(self, k: int, budget_bytes: int) -> None:
        """BudgetTooSmall when shard k's layers cannot fit budget_bytes at the most compressed
        spec allowed: such a budget would only make the controller move, split and recompress
        for every client without ever meeting it."""
        names = self.shards.names
        stats = await asyncio.gather(*(self._answer(j, h.stats.remote()) for j, h in enumerate(self.shards.handles)))
        snap = Snapshot(time.monotonic(), stats[-1].end, tuple(reading(j, n, st) for j, (n, st) in
                                                               enumerate(zip(names, stats))))
        r = snap.shards[k]
        least, spec = least_bytes(r, self.controller, snap)
        if budget_bytes < least:
            kept = r.n_layers - shed(r, self.controller, snap)
            raise BudgetTooSmall(
                f"shard {k} ({r.name}) needs at least {least / MiB:.0f} MiB: {kept} of its layers "
                f"[{r.start}, {r.end}) at {spec} (its KV pool and workspace included), the rest moved "
                f"to neighbours with room or split off; a budget of {budget_bytes / MiB:.0f} MiB "
                f"({budget_bytes} bytes) cannot be met")

    def index(self, shard: int | str) -> int:
        """A shard's index from its index or its actor name; IndexError names the valid ones."""
        if isinstance(shard, str) and not shard.isdigit():
            if shard not in self.shards.names:
                raise IndexError(f"no shard named {shard!r}: the pipeline has {', '.join(self.shards.names)}")
            return self.shards.names.index(shard)
        self._check_index(int(shard))
        return int(shard)

    # ---- changes --------------------------------------------------------------------------
    async def apply(self, action: Action) -> dict:
        """Carry out one action at a step boundary; returns its event. Raises ActionError
        (after rolling back) when it cannot be done."""
        kind = {MoveLayers: "move", Recompress: "recompress", SplitShard: "split",
                ReplaceShard: "restart"}[type(action)]
        shard = action.src if isinstance(action, MoveLayers) else action.shard
        async with self._lock:
            if isinstance(action, ReplaceShard) and not self._known_dead(action) \
                    and await answers(self.shards.handles[action.shard]):
                # already re-placed (the router and the controller both saw it die)
                return {"action": kind, "shard": shard, "ok": True, "skipped": "it answers"}
            before, t0 = self._shape(), time.time()
            event = {"time": t0, "action": kind, "shard": shard, "name": self.shards.names[shard],
                     "reason": action.reason, "before": before}
            try:
                await getattr(self, "_" + kind)(action)
            except Exception as e:
                event.update(ok=False, error=f"{type(e).__name__}: {e}", after=self._shape(),
                             seconds=time.time() - t0)
                self.shards.events.append(event)
                raise ActionError(f"{kind} of shard {shard} failed: {e}", event) from e
            event.update(ok=True, after=self._shape(), seconds=time.time() - t0)
            self.shards.events.append(event)
            return event

    async def _move(self, a: MoveLayers) -> None:
        if abs(a.src - a.dst) != 1:
            raise ValueError(f"layers move between neighbours only, not shard {a.src} -> {a.dst}")
        src, dst = self.shards.handles[a.src], self.shards.handles[a.dst]
        async with self.transport.boundary():
            handoff = src.shrink.remote(a.layers)   # K/V go actor to actor, not via here
            try:
                await dst.grow.remote(a.layers, handoff)
            except Exception:
                await src.grow.remote(a.layers, handoff)   # the layers go back where they were
                raise
            await self._refresh()

    async def _recompress(self, a: Recompress) -> None:
        async with self.transport.boundary():
            await self.shards.handles[a.shard].recompress.remote(a.compression)
            await self._refresh()

    async def _split(self, a: SplitShard) -> None:
        """The new actor loads its layers while the pipeline keeps serving; only the KV handoff
        happens paused. A shard that ends the model gives its lower half (it keeps lm_head),
        any other its upper half (the first keeps the embedding)."""
        k, spec, n = a.shard, self.shards.plan.shards[a.shard], self.shards.plan.n_layers
        if len(spec.layers) < 2 or (spec.layers.is_first() and spec.layers.is_last(n)):
            raise ValueError(f"shard {k} with layers {spec.layers} cannot be split "
                             "(one layer, or it holds both ends of the model)")
        mid = spec.layers.start + len(spec.layers) // 2
        upper = not spec.layers.is_last(n)
        lo, hi = LayerRange(spec.layers.start, mid), LayerRange(mid, spec.layers.end)
        part, keep, at = (hi, lo, k + 1) if upper else (lo, hi, k)
        new_spec = dataclasses.replace(spec, layers=part, budget_bytes=None)
        name = self._fresh_name()
        new = self._start(new_spec, name, len(self.shards.handles) + 1)
        try:
            await new.ready.remote()
            plan = self._split_plan(k, keep, new_spec, at)   # from the plan as it is after the load
            async with self.transport.boundary():
                handoff = self.shards.handles[k].shrink.remote(part)
                try:
                    await new.adopt.remote(handoff)
                except Exception:
                    await self.shards.handles[k].grow.remote(part, handoff)
                    raise
                self.shards.handles.insert(at, new)
                self.shards.names.insert(at, name)
                self.shards.plan = plan
                await self._refresh()
        except Exception:
            if new not in self.shards.handles:
                _kill(new)
            raise

    def _split_plan(self, k: int, keep: LayerRange, new_spec: ShardSpec, at: int):
        """The plan with shard k keeping `keep` and new_spec inserted at `at` (validated)."""
        specs = list(self.shards.plan.shards)
        specs[k] = dataclasses.replace(specs[k], layers=keep)
        specs.insert(at, new_spec)
        return dataclasses.replace(self.shards.plan, shards=tuple(
            dataclasses.replace(s, index=i) for i, s in enumerate(specs)))

    async def _restart(self, a: ReplaceShard) -> None:
        """Re-place shard k with its current layers, compression and budget, under its name.
        The new actor holds no KV: the router recomputes every live sequence (Engine.apply).
        A replacement that dies while it loads (scheduled onto a node that was going down
        before Ray noticed) is tried again, anywhere, up to RESTART_TRIES times."""
        import ray
        k, name, spec = a.shard, self.shards.names[a.shard], self.shards.plan.shards[a.shard]
        async with self.transport.boundary():
            _kill(self.shards.handles[k])
            for attempt in range(RESTART_TRIES):
                await _name_released(name)
                handle = self._start(spec if attempt == 0 else dataclasses.replace(spec, node=None), name,
                                     len(self.shards.handles))
                try:
                    await handle.ready.remote()
                    if spec.budget_bytes is not None:
                        await handle.set_budget.remote(spec.budget_bytes)
                    break
                except ray.exceptions.RayActorError:
                    _kill(handle)
                    if attempt == RESTART_TRIES - 1:
                        raise
                except Exception:
                    _kill(handle)
                    raise
            self.shards.handles[k] = handle
            self._placed_at[name] = time.time()
            await self._refresh()

    # ---- helpers --------------------------------------------------------------------------
    def _known_dead(self, a: ReplaceShard) -> bool:
        """Whether a ping it did not answer came after its last re-placement (no ping needed)."""
        return a.unanswered_at is not None and a.unanswered_at > self._placed_at.get(self.shards.names[a.shard], 0.0)

    def _start(self, spec: ShardSpec, name: str, n_shards: int):
        from shards.runtime.actor import start_shard
        threads = max(1, (os.cpu_count() or 1) // n_shards)
        return start_shard(self.shards.model, spec, self.shards.kv_blocks, self.shards.block_size, name, threads, attach=False)

    def _fresh_name(self) -> str:
        used = {int(n.rsplit("-", 1)[1]) for n in self.shards.names}
        return f"{self.shards.prefix}shard-{max(used) + 1}"

    async def _refresh(self) -> None:
        """Plan ranges and bytes from what the shards now report."""
        stats = await self.stats()
        self.shards.plan = dataclasses.replace(self.shards.plan, shards=tuple(
            dataclasses.replace(s, layers=LayerRange(st.start, st.end), weight_bytes=st.weight_bytes,
                                compression=st.compression)
            for s, st in zip(self.shards.plan.shards, stats)))

    def _set_spec(self, k: int, **changes) -> None:
        shards = list(self.shards.plan.shards)
        shards[k] = dataclasses.replace(shards[k], **changes)
        self.shards.plan = dataclasses.replace(self.shards.plan, shards=tuple(shards))

    def _shape(self) -> list[dict]:
        return [{"shard": s.index, "name": n, "start": s.layers.start, "end": s.layers.end,
                 "compression": s.compression, "weight_bytes": s.weight_bytes, "budget_bytes": s.budget_bytes}
                for s, n in zip(self.shards.plan.shards, self.shards.names)]

    def _check_index(self, k: int) -> None:
        if not 0 <= k < len(self.shards.handles):
            raise IndexError(f"no shard {k}: the pipeline has shards 0..{len(self.shards.handles) - 1}")


async def _name_released(name: str) -> None:
    """Wait (at most NAME_RELEASE_S) until a killed actor's name is free: Ray releases it
    asynchronously, and a new actor under a taken name would fail."""
    import ray
    deadline = time.time() + NAME_RELEASE_S
    while time.time() < deadline:
        try:
            ray.get_actor(name, namespace="shardserve")
        except ValueError:
            return
        await asyncio.sleep(0.1)


def _kill(handle) -> None:
    import ray
    try:
        ray.kill(handle)
    except Exception:   # already gone
        pass
