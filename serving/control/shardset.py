"""The shard actors of one pipeline as both the Transport and the Reconfigurer see them: the
plan, the actor handles and names in pipeline order, and the log of changes and failures."""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from shards.plan.plan import Plan
from shards.runtime.channel import StepFailed

# a live shard answers a ping at once (steps run on its channel threads, pings on Ray's); one
# that has not in this long is hung (a stopped process, a stuck kernel, a swapping node)
PING_TIMEOUT_S = 2.0


@dataclass
class ShardSet:
    model: str
    plan: Plan
    handles: list                    # Ray actor handles, in pipeline order
    kv_blocks: int                   # blocks each shard's pool holds (the smallest pool)
    block_size: int
    prefix: str = ""                 # actor names are <prefix>shard-<k>
    names: list[str] = field(default_factory=list)
    events: deque = field(default_factory=lambda: deque(maxlen=256))   # changes and failures, newest last

    def __post_init__(self) -> None:
        self.handles = list(self.handles)
        if not self.names:
            self.names = [f"{self.prefix}shard-{s.index}" for s in self.plan.shards]


def describe(err: BaseException) -> str:
    """One line for an error from a shard: a RayTaskError's own first line is only the task's
    name, the shard's exception is its cause."""
    if isinstance(err, StepFailed):   # the shard's own type and text, already
        return str(err)[:300]
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]


async def answers(handle, timeout: float | None = None) -> bool:
    """Whether a shard actor is alive and answers a ping within `timeout` (PING_TIMEOUT_S)."""
    try:
        await asyncio.wait_for(handle.ping.remote(), PING_TIMEOUT_S if timeout is None else timeout)
        return True
    except Exception:   # ActorDiedError, unreachable node, timeout: all mean re-place
        return False
