"""The router: continuous batching over shard actors, micro-batch groups pipelined (docs/design.md, "Router").

Runs in one asyncio loop (inside a Serve replica, or a test). A group's step goes through the
Pipeline: over its step channels (shard 0, its hidden states on to shard 1, ...; the last
shard's sampled token ids come back), or as an ObjectRef chain s0.forward -> s1.forward -> ...
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from serving.config import SchedulerSection
from serving.control.pipeline import ActionError, Pipeline, describe
from serving.router.control_link import follow_controller
from serving.router.detokenizer import Detokenizer
from serving.router.metrics import GAUGE_REFRESH_S, RouterMetrics
from serving.router.recovery import Recovery
from serving.router.scheduler import Group, Scheduler, SchedulerConfig, Sequence
from serving.router.stream import Delta, Overloaded, PipelineDown, RequestStream, RequestTimeout
from shards.model.step import SamplingParams, StepBatch
from shards.plan.layer_range import LayerRange
from shards.plan.plan import MoveLayers, Plan, ReplaceShard
from shards.runtime.stats import ShardStats


@dataclass(frozen=True)
class _Flight:
    """A group in the pipeline: what it carries beside its sequences."""

    group: Group
    freed: list[int]       # the frees that rode on its step
    launched: float        # time.perf_counter() at launch


LOOP_ERROR_PAUSE_S = 0.05   # after a fault outside any group, before the loop goes on
log = logging.getLogger("shardserve.router")


class Engine:
    """The router: admission and grouping (Scheduler), steps through the Pipeline, tokens back
    to each request's stream. A step that fails never stops it: the group's sequences are
    recomputed, and a dead shard is re-placed before anything else is launched."""

    def __init__(self, pipeline: Pipeline, tokenizer, eos: set[int], limits: SchedulerSection = SchedulerSection(),
                 controller: str | None = None, prefix_cache: bool = True, max_failures: int = 3,
                 metrics: RouterMetrics | None = None):
        """limits: the config's scheduler section (batch, prefill chunk, queue, timeout);
        metrics: where to record the Prometheus series (None: nowhere)."""
        self.pipeline, self.tokenizer, self.metrics = pipeline, tokenizer, metrics
        self._wake = asyncio.Event()
        pipeline.transport.on_resume = self._wake.set
        self.eos = frozenset(eos)
        # sequence ids from a random 64-bit base: a restarted router (or a second one on the same
        # shards) never reuses an id whose KV a shard may still hold; prefix holders, which are
        # sequences on the shards too, take theirs from the same count
        self._ids = itertools.count(random.getrandbits(62) << 1)
        self.sched = Scheduler(SchedulerConfig(pipeline.shards.kv_blocks, pipeline.shards.block_size, limits.max_batch,
                                               limits.prefill_tokens, n_groups=max(2, len(pipeline.shards.handles)),
                                               prefix_cache=prefix_cache), new_id=lambda: next(self._ids))
        self.max_failures = max_failures   # a sequence whose steps fail this often ends in error
        self.max_waiting = limits.max_waiting  # queued, not admitted: beyond this, Overloaded (429)
        self.timeout_s = limits.timeout_s      # a request still running after this is aborted
        self.requests: dict[int, RequestStream] = {}
        self._inflight: dict[asyncio.Future, _Flight] = {}
        self._hold = 0                       # > 0: a shard is being re-placed, launch nothing
        self.recovery = Recovery(self._recover)
        self.down: str | None = None         # why the pipeline cannot serve, when it cannot
        self._pending_free: list[int] = []   # sent with the next step, or on their own when idle
        self._loop_task: asyncio.Task | None = None
        self._control_task: asyncio.Task | None = None
        self._gauge_task: asyncio.Task | None = None
        self.controller = controller         # the controller actor's name (serving/control/controller.py)
        # per group: (time.time() when it landed, seconds from launch to tokens back, prefill?)
        self.hops: deque[tuple[float, float, bool]] = deque(maxlen=1024)
        self.step_errors: deque[dict] = deque(maxlen=256)  # steps that raised: time, error, sequences
        self.loop_errors: deque[dict] = deque(maxlen=256)  # the router's own faults, caught: time, where, error

    @property
    def plan(self) -> Plan:
        return self.pipeline.shards.plan

    @property
    def shards(self) -> list:
        return self.pipeline.shards.handles

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, matcher=None):
        """Async iterator of Delta for one request; closing it early aborts the request.
        matcher: its structured-output grammar matcher (serving/router/grammar.py), or None.
        Raises PipelineDown when the pipeline cannot serve and a new recovery fails too,
        Overloaded when max_waiting requests already wait, RequestTimeout past timeout_s."""
        self._ensure_loop()
        if self.down:
            await self.recovery.run(self.down)
            if self.down:
                raise PipelineDown(self.down)
        if len(self.sched.waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self.sched.waiting)} requests are waiting (max_waiting {self.max_waiting})")
        req = RequestStream(Sequence(next(self._ids), list(prompt_ids), params, self.eos, matcher=matcher),
                       Detokenizer(self.tokenizer, tuple(params.stop or ())))
        self.sched.add(req.seq)
        self.requests[req.seq.id] = req
        if self.metrics:
            self.metrics.requests.inc()
        self._wake.set()
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(req.queue.get(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"request ran past its {self.timeout_s:g} s timeout") from None
                yield delta
                if delta.finish_reason:
                    return
        finally:
            if req.seq.finished is None:     # client went away: free its KV everywhere
                self._free(self.sched.abort(req.seq.id))
            self.requests.pop(req.seq.id, None)

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Delta:
        """Whole reply at once."""
        text, ids, lps, last, prompt_lps = [], [], [], None, None
        async for d in self.generate(prompt_ids, params):
            text.append(d.text)
            ids += d.token_ids
            lps += d.logprobs or []
            prompt_lps = prompt_lps or d.prompt_logprobs
            last = d
        return Delta("".join(text), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens,
                     last.error, lps if params.logprobs is not None else None, prompt_lps)

    async def warm_up(self, prompt_ids: list[int], max_tokens: int = 2) -> Delta:
        """One request through the whole path (router, step channels, every shard's prefill and
        decode) before the endpoint takes traffic, outside the config's admission limit and
        timeout: a config of max_waiting 0 or a 10 ms timeout must still start. Nothing else
        reaches the engine before it returns."""
        limits = self.max_waiting, self.timeout_s
        self.max_waiting, self.timeout_s = max(self.max_waiting, 1), max(self.timeout_s, 600.0)
        try:
            return await self.complete(prompt_ids, SamplingParams(max_tokens=max_tokens))
        finally:
            self.max_waiting, self.timeout_s = limits

    # ---- the loop -------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        if self.controller and (self._control_task is None or self._control_task.done()):
            self._control_task = asyncio.get_running_loop().create_task(follow_controller(self))
        if self.metrics and (self._gauge_task is None or self._gauge_task.done()):
            self._gauge_task = asyncio.get_running_loop().create_task(self._gauges())

    async def _gauges(self) -> None:
        while True:
            self.metrics.queue(len(self.sched.running), len(self.sched.waiting))
            await asyncio.sleep(GAUGE_REFRESH_S)

    async def _run(self) -> None:
        """The router loop, supervised: an exception in an iteration fails only the group it
        belongs to (its sequences recompute, or end with an error after max_failures), is counted
        in loop_errors and logged, and the loop goes on."""
        while True:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception as e:       # outside any group (a connect, a free): nothing to fail
                self.loop_error("loop", e)
                await asyncio.sleep(LOOP_ERROR_PAUSE_S)    # a fault that repeats must not spin a core

    async def _iteration(self) -> None:
        if not self._inflight and not self._blocked and self.pipeline.transport.needs_connect:
            await self.pipeline.transport.connect()   # no step in flight: none can be overtaken
        self._launch_ready()
        if not self._inflight:
            if self._pending_free and not self._blocked:   # idle: free now, and wait so nothing overtakes it
                ids, self._pending_free = self._pending_free, []
                try:
                    await asyncio.gather(*(s.free.remote(ids) for s in self.shards))
                except Exception as e:   # a dead shard: its KV is gone anyway
                    self.recovery.start(f"free failed: {type(e).__name__}: {e}")
                return
            self._wake.clear()
            await self._wake.wait()
            return
        done, _ = await asyncio.wait(list(self._inflight), return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            self._finish_group(self._inflight.pop(fut), fut)

    def loop_error(self, where: str, err: Exception) -> None:
        self.loop_errors.append({"time": time.time(), "where": where, "error": f"{type(err).__name__}: {err}"})
        log.error("router %s failed: %s", where, err, exc_info=err)

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError when a prompt and its max_tokens could never fit a shard's KV pool."""
        self.sched.check(prompt_tokens, max_tokens)

    @property
    def _blocked(self) -> bool:
        return self.pipeline.transport.paused or self._hold > 0 or self.recovery.active or self.down is not None

    def _launch_ready(self) -> None:
        while not self._blocked:
            pre = sum(f.group.prefill for f in self._inflight.values())
            group, freed = self.sched.next_group(pre, len(self._inflight) - pre)
            self._free(freed)
            if group is None:
                return
            rode = self._pending_free              # the frees this step carries
            try:
                fut = self._chain(group)
            except Exception as e:                 # never launched: its sequences recompute
                self._pending_free = []
                self.loop_error("launch", e)
                self._group_failed(group, e, rode)
                return
            self._inflight[fut] = _Flight(group, rode, time.perf_counter())

    def _chain(self, g: Group):
        width = max(map(len, g.inputs))
        # numpy, not a tensor: Ray serializes it ~4x faster (shards/model/step.py, to_wire)
        tokens = np.array([list(x) + [0] * (width - len(x)) for x in g.inputs], dtype=np.int64)
        batch = StepBatch(list(g.seq_ids), list(g.starts), [len(x) for x in g.inputs], tokens=tokens,
                          sampling=list(g.sampling), steps=list(g.steps), free=self._pending_free,
                          pins=[list(c) for c in g.pins], copies=[list(c) for c in g.copies],
                          alone=not self._inflight, targets=[list(t) for t in g.targets] if any(g.targets) else [],
                          masks=self._masks(g))
        fut = self.pipeline.transport.launch(batch)
        self._pending_free = []
        return fut

    def _masks(self, g: Group) -> list:
        """Each constrained sequence's allowed tokens for a step that samples it; [] if none."""
        seqs = [self.sched.running.get(sid) for sid in g.seq_ids]
        if not any(s is not None and s.matcher is not None for s in seqs):
            return []
        return [s.matcher.mask() if s is not None and s.matcher is not None and keep else None
                for s, keep in zip(seqs, g.samples)]

    def _advance(self, seq: Sequence) -> list[int]:
        """A constrained sequence's new token through its matcher; one the grammar refuses (the
        mask allowed it: a fault) ends the request with an error. Returns ids to free."""
        if seq.matcher is None or seq.matcher.accept(seq.generated[-1]):
            return []
        self._end(seq.id, f"token {seq.generated[-1]} broke the request's output constraint")
        return self.sched.fail(seq.id)

    def _finish_group(self, flight: _Flight, fut: asyncio.Future) -> None:
        self.pipeline.transport.landed()
        group = flight.group
        self.hops.append((time.time(), time.perf_counter() - flight.launched, group.prefill))
        if self.metrics:
            p = self.sched.prefix
            self.metrics.stepped(self.hops[-1][1], group.prefill, (p.hits, p.tokens_copied) if p else (0, 0))
        try:
            out = fut.result()
        except Exception as e:
            self._group_failed(group, e, flight.freed)
            return
        try:
            changed, freed = self.sched.complete(group, out.tokens, out.logprobs)
            for seq in changed:
                bad = self._advance(seq)
                freed += bad or self._emit(seq)
        except Exception as e:                     # the router's own fault: this group recomputes
            self.loop_error("finish", e)
            self._group_failed(group, e, [])
            waiting = {s.id for s in self.sched.waiting}
            for sid in group.seq_ids:   # finished by this very step, so nothing recomputes it: say why
                if sid in self.requests and sid not in self.sched.running and sid not in waiting:
                    self._end(sid, f"the router failed on this reply: {type(e).__name__}: {e}")
            return
        self._free(freed)

    def _group_failed(self, group: Group, err: Exception, rode: list[int] = ()) -> None:
        """A step raised somewhere along the chain (a shard error, or a dead actor). Its
        sequences' KV may be half-written: drop it everywhere and recompute them from their
        token history; one that failed max_failures times ends with an error. The frees that
        rode on it may not have reached the shards after the one that raised: sent again, but
        not for an id whose KV is being rebuilt (a re-prefilled sequence). Then check the
        shards (and re-place dead ones) before launching anything else."""
        why = describe(err)
        self.step_errors.append({"time": time.time(), "error": why, "sequences": len(group.seq_ids)})
        rebuilt = {s.id for s in self.sched.running.values() if s.cached or s.in_flight}
        freed = self.sched.requeue(group.seq_ids, failed=True) + self.sched.prefix_failed(group)
        freed += [sid for sid in rode if sid not in rebuilt and sid not in freed]
        for seq in [s for s in self.sched.waiting if s.id in group.seq_ids]:
            if seq.failures >= self.max_failures:
                freed += self.sched.fail(seq.id)
                self._end(seq.id, f"a step failed {seq.failures} times, last: {why}")
        self._free(freed)
        self.recovery.start(why)

    def _end(self, seq_id: int, error: str) -> None:
        req = self.requests.get(seq_id)
        if req is not None:
            req.queue.put_nowait(Delta("", [], "error", len(req.seq.prompt), len(req.seq.generated), error))

    # ---- recovery and control --------------------------------------------------------------
    async def _recover(self, why: str) -> None:
        """Re-place every dead shard (its sequences recompute); when that is impossible, end
        every request with an error and mark the pipeline down. Run by self.recovery, one at a
        time; nothing launches meanwhile."""
        try:
            await self.pipeline.transport.drained()
            pinged = time.time()
            for k in await self.pipeline.transport.dead():
                await self.apply(ReplaceShard(k, f"shard {k} unreachable after: {why}", unanswered_at=pinged))
                if self.metrics:
                    self.metrics.recovered(True)
            self.down = None
        except Exception as e:
            if self.metrics:
                self.metrics.recovered(False)
            self.down = f"shard lost and not re-placed ({type(e).__name__}: {e}); after: {why}"
            for sid in [s.id for s in self.sched.waiting] + list(self.sched.running):
                self._free(self.sched.fail(sid))
                self._end(sid, self.down)
        finally:
            self._wake.set()

    async def apply(self, action) -> dict:
        """Carry out one controller action at a step boundary (Reconfigurer.apply); returns its event."""
        if isinstance(action, ReplaceShard):
            self._hold += 1
        try:
            try:
                event = await self.pipeline.reconfigure.apply(action)
            except ActionError as e:
                self._acted(e.event)
                raise
            self._acted(event)
            if isinstance(action, ReplaceShard) and "skipped" not in event:
                self._free(self.sched.requeue_all())     # the new actor holds no KV
            self.sched.set_groups(max(2, len(self.pipeline.shards.handles)))
            self._free(self.sched.clear_prefixes())   # holders were pinned on the old pipeline
            return event
        finally:
            if isinstance(action, ReplaceShard):
                self._hold -= 1
                self._wake.set()

    def _acted(self, event: dict) -> None:
        if self.metrics and "skipped" not in event:
            self.metrics.acted(event["action"], bool(event.get("ok")))

    async def set_budget(self, k: int | str, budget_bytes: int | None) -> ShardStats:
        return await self.pipeline.reconfigure.set_budget(k, budget_bytes)

    def _emit(self, seq: Sequence) -> list[int]:
        """Push new text and token ids to the request's stream (its Detokenizer applies stop
        strings). Returns ids to free."""
        req = self.requests.get(seq.id)
        if req is None:
            return self.sched.finish(seq.id, "abort")
        piece = req.detok.step(seq.generated, seq.finished is not None)
        if piece is None:
            return []   # half a multi-byte character: wait for the rest
        freed = []
        if piece.stopped:     # also on a last token (length / eos): the stop string wins
            if seq.finished:
                seq.finished = "stop"
            else:
                freed = self.sched.finish(seq.id, "stop")
        lps = seq.logprobs[len(seq.logprobs) - len(piece.token_ids):] if seq.params.logprobs is not None else None
        prompt_lps, req.first = (seq.prompt_logprobs if req.first else None), False
        if self.metrics:
            now = time.perf_counter()
            self.metrics.emitted(req.started, req.last, now, len(piece.token_ids))
            if seq.finished:
                self.metrics.finished(req.started, now, len(seq.prompt))
            req.last = now if piece.token_ids else req.last
        req.queue.put_nowait(Delta(piece.text, piece.token_ids, seq.finished, len(seq.prompt), len(seq.generated),
                                   logprobs=lps, prompt_logprobs=prompt_lps))
        return freed

    def _free(self, seq_ids: list[int]) -> None:
        if seq_ids:
            self._pending_free += seq_ids
            self._wake.set()

    async def move_layers(self, src: int, dst: int, layers: LayerRange) -> dict:
        """Move boundary layers between neighbouring shards with their live KV; no request fails."""
        return await self.apply(MoveLayers(src, dst, layers, "requested"))

    def close(self) -> None:
        """Stop the router loop (the shard actors are the caller's to keep or kill)."""
        for task in (self._loop_task, self._control_task, self._gauge_task):
            if task is not None:
                task.cancel()
        self.recovery.cancel()
        self.pipeline.close()

    async def timing(self, since: float = 0.0) -> dict:
        """Where a decode step's time goes, medians over decode groups that ended after `since`
        (epoch s): launch to tokens back in the router, each shard's own compute, and the rest
        (Ray hops, object store, the router's wake-up)."""
        hops = sorted(h for t, h, prefill in self.hops if t >= since and not prefill)
        tr = self.pipeline.transport
        shard = await asyncio.gather(*(h.decode_ms.remote(since) for h in self.shards))
        hop = 1000 * hops[len(hops) // 2] if hops else None
        compute = sum(shard) if hops and all(x is not None for x in shard) else None
        return {"decode_groups": len(hops), "decode_hop_ms_p50": hop, "shard_decode_ms_p50": shard,
                "shard_compute_ms": compute, "ray_router_ms": None if compute is None else hop - compute,
                "compiled_graph": tr.graph_active, "graph_steps": tr.graph_steps,
                "channels": tr.channels_active, "channel_steps": tr.channel_steps,
                **self.prefix_stats()}

    def prefix_stats(self) -> dict:
        """Prompts that started after a cached prefix, and the prompt tokens they did not compute."""
        p = self.sched.prefix
        return {"prefix_hits": p.hits if p else 0, "prefix_tokens": p.tokens_copied if p else 0,
                "prefix_holders": len(p.holders) if p else 0}

    async def stats(self) -> list[dict]:
        return await self.pipeline.reconfigure.stats()

