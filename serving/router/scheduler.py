"""Continuous-batching scheduler core: admission, grouping, preemption. Pure: no Ray, no torch.

The router asks `next_group()` whenever a micro-batch slot frees up and reports each group's
sampled tokens with `complete()`. KV is counted in blocks, the same on every shard, so the
scheduler admits and preempts without asking the shards; sequences it evicts are recomputed
later from their token history (prompt + generated so far).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from serving.config import SchedulerSection
from serving.router.prefix import MIN_PIECE, PrefixCache
from shards.model.step import SamplingParams


@dataclass
class SchedulerConfig:
    kv_blocks: int                 # blocks every shard's pool holds (the smallest pool)
    block_size: int = 16           # tokens per block
    # sequences in one group, new tokens in one prefill group (chunked prefill): the config's
    max_batch: int = SchedulerSection.model_fields["max_batch"].default
    prefill_tokens: int = SchedulerSection.model_fields["prefill_tokens"].default
    n_groups: int = 2              # groups of each kind (decode, prefill) in flight (>= number of shards)
    # groups in flight in all: n_groups + 1, so a prefill flies beside n_groups decode groups
    # instead of taking one's place (the decodes it displaced left the shards idle: c=32, 4
    # interleaved pairs, 136.4 -> 152.9 tok/s mean; docs/performance.md)
    extra_groups: int = 1
    prefix_cache: bool = True      # prompts start after a cached block prefix (serving/router/prefix.py)


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    eos: frozenset[int] = frozenset()
    generated: list[int] = field(default_factory=list)
    cached: int = 0                # tokens whose K/V every shard holds
    in_flight: int = 0             # tokens of this sequence in a group now in the pipeline
    finished: str | None = None    # "stop" | "length" | "abort" | "error"
    preemptions: int = 0
    failures: int = 0              # steps of this sequence that raised (recomputed each time)
    # log-probability entries (shards/model/logprobs.py) of each generated token, when asked
    logprobs: list = field(default_factory=list)
    # of each prompt token, when asked: None at 0 (nothing predicts the first), filled per chunk
    prompt_logprobs: list | None = None
    # structured output: the sequence's grammar matcher (serving/router/grammar.py: mask(),
    # accept(token)), advanced by the router as tokens come back; None when unconstrained
    matcher: object = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @functools.cached_property
    def prompt_key(self) -> int:
        return hash(tuple(self.prompt))

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.generated) - self.cached


@dataclass(frozen=True)
class Group:
    """One step for some sequences: feed inputs[b] at positions starts[b].. (decode: 1 token)."""

    seq_ids: tuple[int, ...]
    starts: tuple[int, ...]
    inputs: tuple[tuple[int, ...], ...]
    sampling: tuple[SamplingParams, ...]
    steps: tuple[int, ...]             # tokens generated so far (seeds the sampler)
    samples: tuple[bool, ...]          # this step ends at the sequence's last token: keep its sample
    prefill: bool
    # serving/router/prefix.py: (holder, sequence, tokens) copied into a new holder before the step's
    # frees, and (sequence, holder, tokens) copied into a sequence after them
    pins: tuple[tuple[int, int, int], ...] = ()
    copies: tuple[tuple[int, int, int], ...] = ()
    # per sequence, the prompt tokens following its inputs (StepBatch.targets); () for none
    targets: tuple[tuple[int, ...], ...] = ()


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, new_id: Callable[[], int] | None = None):
        """new_id: ids for prefix holders, which are sequences on the shards (the router passes
        its own count so they never collide with requests'; default negative ids)."""
        self.cfg = cfg
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._last_prefill = False
        self.prefix = PrefixCache(cfg.block_size) if cfg.prefix_cache else None
        self.new_id = new_id or itertools.count(-1, -1).__next__
        self._pins: list[tuple[int, int, int]] = []      # ride on the next group launched

    def set_groups(self, n_groups: int) -> None:
        """Groups of each kind in flight: at least the number of shards (it changes on a split)."""
        self.cfg = dataclasses.replace(self.cfg, n_groups=n_groups)

    def blocks(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.cfg.block_size)

    @property
    def used_blocks(self) -> int:
        held = self.prefix.blocks_held if self.prefix else 0
        return held + sum(self.blocks(s.cached + s.in_flight) for s in self.running.values())

    def check(self, n_prompt: int, max_tokens: int = 1) -> None:
        """Refuse what could never fit the KV pool, with the numbers: a sequence that could not
        reach prompt + max_tokens even alone would hold the pool and stall everyone."""
        if not n_prompt:
            raise ValueError("empty prompt")
        need = self.blocks(n_prompt + max_tokens)
        if need > self.cfg.kv_blocks:
            raise ValueError(f"prompt of {n_prompt} tokens + max_tokens {max_tokens} needs {need} KV blocks "
                             f"of {self.cfg.block_size} tokens, the pipeline holds {self.cfg.kv_blocks} "
                             f"({self.cfg.kv_blocks * self.cfg.block_size} tokens)")

    def add(self, seq: Sequence) -> None:
        self.check(len(seq.prompt), seq.params.max_tokens)
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> list[int]:
        """Mark seq_id aborted; returns ids whose KV the shards should free now."""
        if self._end_waiting(seq_id, "abort"):
            return []
        s = self.running.get(seq_id)
        if s is None:
            return []
        s.finished = "abort"
        if s.in_flight:
            return []  # freed when its group comes back
        del self.running[seq_id]
        return [seq_id]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.in_flight for s in self.running.values())

    def next_group(self, prefills_flying: int = 0, decodes_flying: int = 0) -> tuple[Group | None, list[int]]:
        """The next group to launch (or None) and ids the shards must free first (preempted).
        *_flying: groups of each kind in the pipeline now (SchedulerConfig says how many may)."""
        freed: list[int] = []
        self._admit(freed)
        n, total = self.cfg.n_groups, prefills_flying + decodes_flying
        if total >= n + self.cfg.extra_groups:
            return None, freed
        idle = [s for s in self.running.values() if not s.in_flight and not s.finished]
        prefills = [s for s in idle if s.pending > 1 and not self._behind(s)] if prefills_flying < n else []
        decodes = [s for s in idle if s.pending == 1] if decodes_flying < n else []
        use_prefill = bool(prefills) and (not decodes or not self._last_prefill or self._pins_feed(prefills))
        chosen = self._take_prefill(prefills) if use_prefill else self._take_decode(decodes)
        picked, copies = [], []
        for s, n in chosen:
            # a later member of `chosen` may have been evicted to make room for an earlier one
            if s.id not in self.running:
                continue
            hit = self._prefix_hit(s, n)
            used = [c[1] for c in copies] + ([hit[0]] if hit else [])
            # a copy's blocks are s's own: its whole prompt is fitted, then the copied part cached
            if self._fit(s, n, freed, keep=[x for x, _ in picked], holders=used):
                if hit:
                    s.cached = hit[1]
                    n -= s.cached
                    copies.append((s.id, *hit))
                    self.prefix.hits += 1
                    self.prefix.tokens_copied += s.cached
                s.in_flight = n              # counted in used_blocks from now on
                picked.append((s, n))
        if not picked:
            return None, freed
        self._last_prefill = use_prefill
        toks = [s.tokens for s, _ in picked]
        pins, self._pins = tuple(self._pins), []
        return Group(tuple(s.id for s, _ in picked), tuple(s.cached for s, _ in picked),
                     tuple(tuple(t[s.cached:s.cached + n]) for (s, n), t in zip(picked, toks)),
                     tuple(s.params for s, _ in picked), tuple(len(s.generated) for s, _ in picked),
                     tuple(s.cached + n == len(t) for (s, n), t in zip(picked, toks)), use_prefill,
                     pins, tuple(copies), tuple(_targets(s, n) for s, n in picked)), freed

    def _prefix_hit(self, s: Sequence, n: int) -> tuple[int, int] | None:
        """(holder, tokens) to copy before s prefills its whole history from nothing, or None."""
        # prompt log probabilities need every prompt position computed
        if self.prefix is None or s.cached or n != s.pending or s.params.prompt_logprobs is not None:
            return None
        return self.prefix.lookup(s.tokens, riding={h for h, _, _ in self._pins})

    def _pins_feed(self, prefills: list[Sequence]) -> bool:
        """A prompt waiting to prefill can copy a pin that rides on the next group: let that
        group be its prefill (a pin on a decode group is usable only once that group is back)."""
        return bool(self._pins) and any(self._prefix_hit(s, s.pending) for s in prefills)

    def _behind(self, s: Sequence) -> bool:
        """s would prefill a prompt that an earlier sequence (a request's other choice, or the
        same prompt sent twice at once) has yet to prefill: it waits, then copies that one's
        blocks (its pin rides on s's step), so the prompt is computed once."""
        if self.prefix is None or s.cached or s.params.prompt_logprobs is not None \
                or len(s.prompt) - MIN_PIECE < self.cfg.block_size:
            return False
        ahead = itertools.chain(self.running.values(), self.waiting)
        return any(o.id < s.id and not o.finished and o.cached < len(o.prompt) and o.prompt_key == s.prompt_key
                   and o.prompt == s.prompt for o in ahead)

    def _admit(self, freed: list[int]) -> None:
        while self.waiting:
            s = self.waiting[0]
            free = self.cfg.kv_blocks - self.used_blocks
            if len(self.running) >= 4 * self.cfg.max_batch:
                return
            if self.blocks(len(s.tokens) + 1) > free:
                gone = self.prefix.evict() if self.prefix else None   # holders yield to requests
                if gone is None:
                    return
                freed.append(gone)
                continue
            self.running[s.id] = self.waiting.popleft()

    def _take_prefill(self, prefills: list[Sequence]) -> list[tuple[Sequence, int]]:
        budget, out = self.cfg.prefill_tokens, []
        for s in prefills:
            # a prompt that does not fit what is left of the budget ends the group and leads the
            # next one: one that fits a group is prefilled in one piece, a longer one in pieces of
            # the whole budget (and its rest). Cut at the budget's edge, pieces of 1-4 tokens
            # were common, and attention over such a piece gives its rows other last bits
            # (measured: the README question's "The" - "L" margin 0.0875 whole, -0.149 .. 0.388
            # with a 2-4 token piece first or last), which flipped its greedy answer under 12
            # concurrent requests.
            if len(out) >= self.cfg.max_batch or (out and s.pending > budget):
                break
            n = min(s.pending, budget)
            out.append((s, n))
            budget -= n
        return out

    def _take_decode(self, decodes: list[Sequence]) -> list[tuple[Sequence, int]]:
        # split the active decodes evenly across the groups in flight, so every shard stays busy
        active = sum(1 for s in self.running.values() if not s.finished)
        size = min(self.cfg.max_batch, max(1, math.ceil(active / self.cfg.n_groups)))
        return [(s, 1) for s in decodes[:size]]

    def _fit(self, s: Sequence, n: int, freed: list[int], keep: list[Sequence], holders=()) -> bool:
        """Reserve blocks for n more tokens of s, evicting prefix holders (not `holders`, which
        this group copies from) and then the newest idle sequences if needed."""
        extra = self.blocks(s.cached + n) - self.blocks(s.cached)
        while self.cfg.kv_blocks - self.used_blocks < extra:
            gone = self.prefix.evict(keep=holders) if self.prefix else None
            if gone is not None:
                freed.append(gone)
                continue
            victims = [v for v in self.running.values()
                       if not v.in_flight and v is not s and v not in keep and v.cached > 0]
            if not victims:
                return False
            v = victims[-1]                      # newest first: the oldest keep their progress
            del self.running[v.id]
            v.cached, v.preemptions = 0, v.preemptions + 1
            self.waiting.appendleft(v)
            freed.append(v.id)
        return True

    def complete(self, group: Group, tokens: list[int], logprobs: list | None = None
                 ) -> tuple[list[Sequence], list[int]]:
        """Record a group's sampled tokens (and their log-probability records, per sequence).
        Returns (sequences that gained a token or finished, ids whose KV the shards should free)."""
        changed, freed = [], []
        if self.prefix:
            self.prefix.confirm(h for h, _, _ in group.pins)
        records = logprobs or [None] * len(tokens)
        for sid, n, keep, tok, rec in zip(group.seq_ids, map(len, group.inputs), group.samples, tokens, records):
            s = self.running.get(sid)
            if s is None:
                continue
            if rec is not None and rec[1]:
                _record_prompt(s, rec[1])
            if keep and not s.finished and s.params.logprobs is not None:
                s.logprobs.append(rec[0] if rec else None)
            s.cached += n
            s.in_flight = 0
            if self.prefix and group.prefill and s.cached - n < len(s.prompt) <= s.cached and not s.finished:
                pin = self.prefix.offer(s.prompt, self.new_id, self.cfg.kv_blocks - self.used_blocks)
                if pin:                  # copied on every shard before the next step's frees
                    self._pins.append((pin[0], sid, pin[1]))
            if keep and not s.finished:
                s.generated.append(tok)
                if tok in s.eos:
                    s.finished = "stop"
                elif len(s.generated) >= s.params.max_tokens:
                    s.finished = "length"
                changed.append(s)
            if s.finished:
                del self.running[sid]
                freed.append(sid)
        return changed, freed

    def finish(self, seq_id: int, reason: str) -> list[int]:
        """The router saw a stop string: end seq_id now (it is not in flight after complete())."""
        s = self.running.pop(seq_id, None)
        if s is None:
            return []
        s.finished = reason
        return [seq_id]

    def requeue(self, seq_ids, failed: bool = False) -> list[int]:
        """Recompute these running sequences from their token history (a step failed, or a
        shard lost its KV): KV dropped everywhere, back to the head of the queue. failed=True
        counts a failure against each. Returns ids whose KV the shards should free."""
        freed = []
        for sid in seq_ids:
            s = self.running.pop(sid, None)
            if s is None:
                continue
            freed.append(sid)
            if s.finished:       # aborted while in flight: nothing to recompute
                continue
            s.cached, s.in_flight = 0, 0
            s.preemptions += 1
            s.failures += failed
            self.waiting.appendleft(s)
        return freed

    def prefix_failed(self, group: Group) -> list[int]:
        """A failed group's holders (those it pinned, and those it copied from: a shard that
        lacks one raised there) are dropped; returns the holder ids the shards should free."""
        if self.prefix is None:
            return []
        return self.prefix.drop([h for h, _, _ in group.pins] + [h for _, h, _ in group.copies])

    def clear_prefixes(self) -> list[int]:
        """Every holder dropped (the pipeline changed); returns their ids for the shards to free."""
        if self.prefix is None:
            return []
        self._pins = []
        return self.prefix.clear()

    def requeue_all(self) -> list[int]:
        """Every running sequence recomputes (a replaced shard holds no KV)."""
        return self.requeue([sid for sid, s in self.running.items() if not s.in_flight])

    def fail(self, seq_id: int) -> list[int]:
        """End seq_id with "error" wherever it is. Returns ids whose KV the shards should free."""
        if self._end_waiting(seq_id, "error"):
            return []
        s = self.running.pop(seq_id, None)
        if s is None:
            return []
        s.finished = "error"
        return [seq_id]

    def _end_waiting(self, seq_id: int, reason: str) -> bool:
        """Finish seq_id if it waits (it holds no KV); False when it does not wait."""
        for s in self.waiting:
            if s.id == seq_id:
                self.waiting.remove(s)
                s.finished = reason
                return True
        return False


def _targets(s: Sequence, n: int) -> tuple[int, ...]:
    """The prompt tokens that follow s's next n positions (from s.cached), when s asked for
    prompt log probabilities."""
    if s.params.prompt_logprobs is None:
        return ()
    return tuple(s.prompt[s.cached + 1:min(s.cached + n + 1, len(s.prompt))])


def _record_prompt(s: Sequence, got: list) -> None:
    """A prefill step's prompt entries: the one at position p is prompt token p + 1's. A
    recomputed step writes the same positions again."""
    if s.prompt_logprobs is None:
        s.prompt_logprobs = [None] * len(s.prompt)
    for j, entry in enumerate(got):
        s.prompt_logprobs[s.cached + 1 + j] = entry
