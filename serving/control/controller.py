"""The controller: a named, detached Ray actor (`<prefix>controller`, namespace `shardserve`)
that polls every shard of the pipelines it watches once a second, runs the pure policy
(serving/control/policy.py) and hands the resulting actions to the router, which carries them out at a
step boundary (serving/control/pipeline.py) and reports back.

The router pulls (`sync`, once a second) rather than the controller pushing: the router may
live in a Serve replica or a plain process, and a pull needs no handle to it. Ray restarts a
dead controller (max_restarts=-1); the next `sync` tells it the pipeline again (re-adoption),
so it keeps no state worth losing beyond its hysteresis counters.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from serving.config import ControllerConfig
from serving.control.policy import PolicyState, Snapshot, acted, decide, reading
from shards.plan.plan import ReplaceShard

NAMESPACE = "shardserve"
POLL_S = 1.0
STATS_TIMEOUT_S = 10.0
log = logging.getLogger("shardserve.controller")


@dataclass
class _Watched:
    names: list[str]
    n_layers: int
    state: PolicyState = field(default_factory=PolicyState)
    pending: list = field(default_factory=list)    # actions the router has not taken yet
    busy: bool = False                             # actions handed out, not reported yet
    readings: list = field(default_factory=list)   # recent snapshots, newest last (bounded)


class Controller:
    def __init__(self, config: dict | None = None):
        self.cfg = ControllerConfig(**(config or {}))
        self.pipelines: dict[str, _Watched] = {}
        self._task: asyncio.Task | None = None
        self._handles: dict[str, object] = {}

    async def sync(self, pid: str, names: list[str], n_layers: int, done: list[dict]) -> list:
        """The router's once-a-second call: its shard names now, the events of the actions it
        carried out since the last call. Returns the actions to carry out next."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll_forever())
        w = self.pipelines.get(pid)
        if w is None:     # first sight (or we were restarted): adopt it
            w = self.pipelines[pid] = _Watched(list(names), n_layers)
        w.names, w.n_layers = list(names), n_layers
        if done:
            w.state = acted(w.state, time.monotonic())
        # the router carries out what it gets before its next sync: busy until then
        actions, w.pending = w.pending, []
        w.busy = bool(actions)
        return actions

    async def rss(self) -> int:
        """This actor's resident bytes (soak tests check it stays flat)."""
        import psutil
        return psutil.Process().memory_info().rss

    async def status(self, pid: str) -> dict:
        """What the controller sees: its state and the latest snapshots (for tests and debugging)."""
        w = self.pipelines.get(pid)
        if w is None:
            return {}
        return {"pid": os.getpid(), "names": w.names, "busy": w.busy, "pending": [repr(a) for a in w.pending],
                "over": dict(w.state.over), "raised": dict(w.state.raised), "readings": w.readings[-5:]}

    async def _poll_forever(self) -> None:
        while True:
            started = time.monotonic()
            for pid, w in list(self.pipelines.items()):
                try:
                    await self._poll(w)
                except Exception:   # never let one bad poll stop the loop
                    log.exception("controller poll of pipeline %r failed", pid)
            await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - started)))

    async def _poll(self, w: _Watched) -> None:
        if w.busy or w.pending:
            return
        names = list(w.names)
        results = await asyncio.gather(*(self._stats(n) for n in names), return_exceptions=True)
        dead = [k for k, r in enumerate(results) if isinstance(r, BaseException)]
        if dead:
            k = dead[0]
            w.pending = [ReplaceShard(k, f"shard {k} ({names[k]}) did not answer stats: "
                                         f"{type(results[k]).__name__}")]
            self._handles.pop(names[k], None)
            return
        snap = Snapshot(time.monotonic(), w.n_layers,
                        tuple(reading(k, n, st) for k, (n, st) in enumerate(zip(names, results))))
        w.readings = (w.readings + [[{"name": r.name, "used_bytes": r.used_bytes, "budget_bytes": r.budget_bytes}
                                     for r in snap.shards]])[-20:]
        actions, w.state = decide(snap, self.cfg, w.state)
        w.pending = actions

    async def _stats(self, name: str) -> dict:
        import ray
        h = self._handles.get(name)
        if h is None:
            h = self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        try:
            return await asyncio.wait_for(h.stats.remote(), STATS_TIMEOUT_S)
        except Exception:
            self._handles.pop(name, None)   # a replaced shard has a new actor under the same name
            raise


def start_controller(prefix: str = "", config: dict | None = None):
    """The pipeline's controller actor, started once (or the running one)."""
    import ray
    return ray.remote(Controller).options(
        name=f"{prefix}controller", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, num_cpus=0).remote(config)
