"""The router: continuous batching over shard actors, micro-batch groups pipelined (DESIGN.md 4).

Runs in one asyncio loop (inside a Serve replica, or a test). A group's step is an ObjectRef
chain s0.forward -> s1.forward -> ... ; hidden states go actor to actor through Ray's object
store, only sampled token ids come back here.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import torch

from serving.scheduler import Group, Scheduler, SchedulerConfig, Sequence
from shards.layer_range import LayerRange
from shards.plan import Plan
from shards.step import SamplingParams, StepBatch


@dataclass
class Delta:
    """What a request's stream yields: new text and token ids; finish_reason on the last."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Request:
    seq: Sequence
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""        # text sent so far
    sent: int = 0         # generated tokens sent so far
    prefix_at: int = 0    # detokenization window: decode from here ...
    read_at: int = 0      # ... text up to here was already sent


class Engine:
    def __init__(self, plan: Plan, shards: list, tokenizer, eos: set[int], kv_blocks: int,
                 block_size: int = 16, max_batch: int = 32, prefill_tokens: int = 256):
        self.plan, self.shards, self.tokenizer = plan, list(shards), tokenizer
        self.eos = frozenset(eos)
        self.sched = Scheduler(SchedulerConfig(kv_blocks, block_size, max_batch, prefill_tokens,
                                               n_groups=max(2, len(shards))))
        self.requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._inflight: dict[asyncio.Future, Group] = {}
        self._wake = asyncio.Event()
        self._paused = False
        self._pending_free: list[int] = []   # sent with the next step, or on their own when idle
        self._loop_task: asyncio.Task | None = None
        self.hop_log: list[float] = []  # seconds from launch to tokens back, per group

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        """Async iterator of Delta for one request; closing it early aborts the request."""
        self._ensure_loop()
        req = _Request(Sequence(next(self._ids), list(prompt_ids), params, self.eos))
        self.sched.add(req.seq)
        self.requests[req.seq.id] = req
        self._wake.set()
        try:
            while True:
                delta = await req.queue.get()
                yield delta
                if delta.finish_reason:
                    return
        finally:
            if req.seq.finished is None:     # client went away: free its KV everywhere
                self._free(self.sched.abort(req.seq.id))
            self.requests.pop(req.seq.id, None)

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Delta:
        """Whole reply at once."""
        text, ids, last = [], [], None
        async for d in self.generate(prompt_ids, params):
            text.append(d.text)
            ids += d.token_ids
            last = d
        return Delta("".join(text), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    # ---- the loop -------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._launch_ready()
            if not self._inflight:
                if self._pending_free:       # idle: free now, and wait so nothing overtakes it
                    ids, self._pending_free = self._pending_free, []
                    await asyncio.gather(*(s.free.remote(ids) for s in self.shards))
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            done, _ = await asyncio.wait(list(self._inflight), return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                self._finish_group(self._inflight.pop(fut), fut)

    def _launch_ready(self) -> None:
        while not self._paused and len(self._inflight) < self.sched.cfg.n_groups:
            group, freed = self.sched.next_group()
            self._free(freed)
            if group is None:
                return
            ref = self._chain(group)
            fut = asyncio.ensure_future(asyncio.wrap_future(ref.future()))
            fut.launched = time.perf_counter()
            self._inflight[fut] = group

    def _chain(self, g: Group):
        width = max(map(len, g.inputs))
        tokens = torch.tensor([list(x) + [0] * (width - len(x)) for x in g.inputs], dtype=torch.long)
        batch = StepBatch(list(g.seq_ids), list(g.starts), [len(x) for x in g.inputs], tokens=tokens,
                          sampling=list(g.sampling), steps=list(g.steps), free=self._pending_free,
                          alone=not self._inflight)
        self._pending_free = []
        ref = batch
        for shard in self.shards:
            ref = shard.forward.remote(ref)
        return ref

    def _finish_group(self, group: Group, fut: asyncio.Future) -> None:
        self.hop_log.append(time.perf_counter() - fut.launched)
        tokens = fut.result()  # a shard error propagates: the loop dies loudly, not silently
        changed, freed = self.sched.complete(group, tokens)
        for seq in changed:
            freed += self._emit(seq)
        self._free(freed)

    def _emit(self, seq: Sequence) -> list[int]:
        """Push new text and token ids to the request's stream; apply stop strings.
        Returns ids to free. Detokenizes incrementally (a window from the last emitted point,
        as vLLM does), never the whole reply per token."""
        req = self.requests.get(seq.id)
        if req is None:
            return self.sched.finish(seq.id, "abort")
        gen = seq.generated
        before = self.tokenizer.decode(gen[req.prefix_at:req.read_at], skip_special_tokens=True)
        window = self.tokenizer.decode(gen[req.prefix_at:], skip_special_tokens=True)
        if window.endswith("\ufffd") and not seq.finished:
            return []  # half a multi-byte character: wait for the rest
        new, freed = window[len(before):], []
        if seq.params.stop and not seq.finished:
            # search only where a stop string could newly appear: the tail of the old text + new
            tail = max(0, len(req.text) - max(map(len, seq.params.stop)) + 1)
            text = req.text + new
            hits = [i for i in (text.find(x, tail) for x in seq.params.stop) if i >= 0]
            if hits:
                new = text[len(req.text):min(hits)] if min(hits) >= len(req.text) else ""
                freed = self.sched.finish(seq.id, "stop")
        req.prefix_at, req.read_at = req.read_at, len(gen)
        req.text += new
        ids, req.sent = gen[req.sent:], len(gen)
        req.queue.put_nowait(Delta(new, ids, seq.finished, len(seq.prompt), len(gen)))
        return freed

    def _free(self, seq_ids: list[int]) -> None:
        if seq_ids:
            self._pending_free += seq_ids
            self._wake.set()

    # ---- re-sharding building blocks -----------------------------------------------------
    async def pause(self) -> None:
        """Stop launching groups and wait until none is in flight (a step boundary)."""
        self._paused = True
        while self._inflight:
            await asyncio.sleep(0.002)

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def move_layers(self, src: int, dst: int, layers: LayerRange) -> None:
        """Move boundary layers between neighbouring shards with their live KV; no request fails."""
        if abs(src - dst) != 1:
            raise ValueError(f"layers move between neighbours only, not shard {src} -> {dst}")
        await self.pause()
        try:
            kv = self.shards[src].shrink.remote(layers)   # K/V go actor to actor, not via here
            await self.shards[dst].grow.remote(layers, kv)
            stats = await asyncio.gather(*(s.stats.remote() for s in self.shards))
            self.plan = _replan(self.plan, [LayerRange(s["start"], s["end"]) for s in stats])
        finally:
            self.resume()

    def close(self) -> None:
        """Stop the router loop (the shard actors are the caller's to keep or kill)."""
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def stats(self) -> list[dict]:
        return list(await asyncio.gather(*(s.stats.remote() for s in self.shards)))


def _replan(plan: Plan, ranges: list[LayerRange]) -> Plan:
    from dataclasses import replace
    return replace(plan, shards=tuple(replace(s, layers=r) for s, r in zip(plan.shards, ranges)))
