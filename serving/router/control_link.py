"""The router's link to the controller actor (serving/control/controller.py): every second it
tells the controller what the pipeline looks like and what was done, and carries out the
actions it gets back, through the engine, at step boundaries."""
from __future__ import annotations

import asyncio
import time

from serving.control.pipeline import ActionError

CONTROL_PERIOD_S = 1.0   # how often the router syncs with the controller actor


async def follow_controller(engine) -> None:
    """Sync with engine.controller (the actor's name) forever. A dead controller is looked up
    again (Ray restarts it; it re-adopts the pipeline from this sync); a failed action is
    reported as an event; one that raised otherwise (a stale shard index) is counted in the
    engine's loop errors, never fatal."""
    import ray

    from serving.control.controller import NAMESPACE
    done: list[dict] = []
    handle = None
    while True:
        await asyncio.sleep(CONTROL_PERIOD_S)
        p = engine.pipeline.shards
        try:
            handle = handle or ray.get_actor(engine.controller, namespace=NAMESPACE)
            actions = await handle.sync.remote(p.prefix, list(p.names), p.plan.n_layers, done)
            done = []
        except Exception:   # restarting, or gone: look it up again next time
            handle = None
            continue
        for a in actions:
            try:
                done.append(await engine.apply(a))
            except ActionError as e:
                done.append(e.event)
            except Exception as e:
                engine.loop_error("control", e)
                done.append({"time": time.time(), "action": type(a).__name__, "ok": False,
                             "error": f"{type(e).__name__}: {e}"})
