"""One request's choices (a prompt each, times n) as concurrent router streams: started
together, drained together, or merged into one event stream in arrival order. Pure asyncio."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

Next = Callable[[AsyncIterator], Awaitable]      # the next delta of a stream (raising the API's errors)


async def start(gens: list[AsyncIterator], nxt: Next) -> list:
    """Each stream's first delta, awaited together; when one raises (429, 503, ...), every
    stream is closed (its request aborted) and the first error raised."""
    firsts = await asyncio.gather(*(nxt(g) for g in gens), return_exceptions=True)
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        await close(gens)
        raise errors[0]
    return firsts


async def drain(gens: list[AsyncIterator], firsts: list, nxt: Next) -> list[list]:
    """Every delta of every stream, the streams read concurrently."""
    async def one(g, d) -> list:
        out = [d]
        while not out[-1].finish_reason:
            out.append(await nxt(g))
        return out
    return list(await asyncio.gather(*(one(g, d) for g, d in zip(gens, firsts))))


async def merged(gens: list[AsyncIterator], firsts: list, nxt: Next) -> AsyncIterator[tuple[int, object]]:
    """(index, delta) of every stream as they arrive, each stream's first delta first; an
    exception in one stream is raised here."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g) -> None:
        d = firsts[i]
        try:
            while True:
                await queue.put((i, d, None))
                if d.finish_reason:
                    return
                d = await nxt(g)
        except Exception as e:
            await queue.put((i, None, e))
    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        open_streams = len(gens)
        while open_streams:
            i, d, err = await queue.get()
            if err is not None:
                raise err
            open_streams -= bool(d.finish_reason)
            yield i, d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)   # none still inside a stream to close


async def close(gens: list[AsyncIterator]) -> None:
    """Close every stream: the router aborts what is unfinished and frees its KV."""
    for g in gens:
        await g.aclose()
