"""Prompt-prefix cache: a prompt that begins with tokens of an earlier prompt starts its prefill
after them, their K/V copied from a pinned holder on every shard. Pure: no Ray, no torch.

Why: most requests open with the same chat template and system prompt (SmolLM2's: 24 of the
serving prompts' 44.5 tokens on average), a chat's next turn repeats the whole conversation
before it, and at c=32 prefill is half of the rows the shards compute (docs/performance.md,
"Prefix cache").

How: after a sequence's prompt is prefilled, its K/V for the whole prompt is copied on every
shard into a holder, a pseudo-sequence of the pipeline with an id of its own (a *pin*). A later
prompt that shares its first n tokens with a holder's (the longest such n over the holders, to
the token, not rounded to KV blocks) gets a copy of the holder's first ceil(n / block) blocks
into its own blocks and prefills from position n on, writing over whatever the last copied
block holds past n (attention reads only positions before the query's). Copies, not shared
blocks: a sequence owns every block it uses, so frees, preemption, moves and recovery need no
reference counts, and the scheduler's block count stays exact (holders count their blocks).
Pins and copies ride on a step as frees do, so every shard sees them in launch order: pins
before the step's frees (a pin may read a sequence that step frees), copies after (a
re-prefilled id is freed first).

A holder is used only once the step carrying its pin completed on every shard (confirmed); a
failed step drops the holders it pinned or copied from (a shard missing one raises on the copy,
and that group is recomputed without it). Every change of the pipeline drops all holders. A copy
covers at least one block's worth of tokens and leaves at least MIN_PIECE tokens to prefill, the
same piece length the scheduler never cuts below, so a sequence's logits keep their bits
(docs/design.md, "Batch-invariant numbers").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_PIECE = 5          # tokens a copied-into prompt still prefills itself


@dataclass
class Holder:
    tokens: list[int]        # the pinned prompt, whose K/V the holder keeps (a list, as prompts are)
    confirmed: bool          # its pin's step completed on every shard
    used: int                # tick of the last hit (least recently used goes first)


def common_prefix(a: list[int], b: list[int], block: int = 16) -> int:
    """Length of the longest common prefix of token lists a and b: compared a slice of
    `block` tokens at a time (one C-level comparison each), then token by token in the first
    slice that differs."""
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + block] == b[i:i + block]:
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return min(i, n)


class PrefixCache:
    def __init__(self, block_size: int, max_holders: int = 16):
        self.block_size, self.max_holders = block_size, max_holders
        self.holders: dict[int, Holder] = {}
        self._tick = 0
        self.hits = 0              # prompts that started after a copied prefix (the scheduler counts)
        self.tokens_copied = 0     # prompt tokens not recomputed

    def blocks(self, hid: int) -> int:
        return math.ceil(len(self.holders[hid].tokens) / self.block_size)

    @property
    def blocks_held(self) -> int:
        return sum(self.blocks(hid) for hid in self.holders)

    def _longest(self, tokens, usable) -> tuple[int, int]:
        """(holder, n): the holder among `usable` sharing the longest prefix with tokens, and its
        length (0 when none shares a token)."""
        best = (0, 0)
        for hid in usable:
            n = common_prefix(tokens, self.holders[hid].tokens, self.block_size)
            if n > best[1]:
                best = (hid, n)
        return best

    def lookup(self, tokens: list[int], riding=frozenset()) -> tuple[int, int] | None:
        """(holder, tokens to copy) of the longest confirmed cached prefix of `tokens`, cut to
        leave at least MIN_PIECE tokens to prefill, when that is at least one block long; else
        None. `riding`: holders whose pins ride on the very step that would copy from them (a
        shard pins before it copies; a failed step drops both)."""
        usable = [hid for hid, h in self.holders.items() if h.confirmed or hid in riding]
        hid, n = self._longest(tokens, usable)
        n = min(n, len(tokens) - MIN_PIECE)
        if n < self.block_size:
            return None
        self._tick += 1
        self.holders[hid].used = self._tick
        return hid, n

    def offer(self, prompt: list[int], new_id, room: int) -> tuple[int, int] | None:
        """A prefilled prompt: (holder id, tokens) to pin, the whole prompt, when it is longer than
        a block plus MIN_PIECE, no holder already serves every token a repeat of it could copy,
        and `room` free blocks take it (new_id() names the holder); else None."""
        n, need = len(prompt), math.ceil(len(prompt) / self.block_size)
        if n - MIN_PIECE < self.block_size or need > room or len(self.holders) >= self.max_holders:
            return None
        if self._longest(prompt, self.holders)[1] >= n - MIN_PIECE:
            return None
        hid = new_id()
        self.holders[hid] = Holder(list(prompt), False, self._tick)
        return hid, n

    def confirm(self, holder_ids) -> None:
        for hid in holder_ids:
            if hid in self.holders:
                self.holders[hid].confirmed = True

    def drop(self, holder_ids) -> list[int]:
        """Forget these holders; returns those that existed (the shards must free them)."""
        return [hid for hid in dict.fromkeys(holder_ids) if self.holders.pop(hid, None) is not None]

    def evict(self, keep=()) -> int | None:
        """The least recently used holder not in keep, forgotten (free it), or None."""
        left = [(h.used, hid) for hid, h in self.holders.items() if hid not in keep]
        if not left:
            return None
        return self.drop([min(left)[1]])[0]

    def clear(self) -> list[int]:
        return self.drop(list(self.holders))
