"""Single-flight recovery: one check-and-re-place of the pipeline at a time.

A failed step, a failed free and a request that finds the pipeline down all ask for recovery;
only the first starts it, the others wait for that one. While it runs the router launches
nothing (`active`), so no step goes to a shard that is being re-placed.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


class Recovery:
    def __init__(self, check: Callable[[str], Awaitable[None]]):
        """check(why): drain, find dead shards, re-place them (or mark the pipeline down)."""
        self._check = check
        self._task: asyncio.Task | None = None
        self.runs = 0              # recoveries started (each one served every caller meanwhile)

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, why: str) -> asyncio.Task:
        """The recovery in progress, or a new one for `why`."""
        if not self.active:
            self.runs += 1
            self._task = asyncio.get_running_loop().create_task(self._check(why))
        return self._task

    async def run(self, why: str) -> None:
        """Start one (or join the one in progress) and wait for it; a caller that goes away
        does not cancel it for the others."""
        await asyncio.shield(self.start(why))

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
