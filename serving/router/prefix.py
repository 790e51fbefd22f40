"""Prompt-prefix cache: a prompt whose first whole KV blocks equal an earlier prompt's starts
its prefill after them, its K/V copied from a pinned holder on every shard. Pure: no Ray, no torch.

Why: most requests open with the same chat template and system prompt (SmolLM2's: 24 of the
serving prompts' 44.5 tokens on average, 16 of them in a whole block), and at c=32 prefill is
half of the rows the shards compute (docs/performance.md, "Prefix cache").

How: after a sequence's prompt is prefilled, its first `j` whole blocks are copied on every
shard into a holder, a pseudo-sequence of the pipeline with an id of its own (a *pin*). A later
prompt with the same first `16 i` tokens (i <= j) gets a *copy* of the holder's first i blocks
into its own blocks, then prefills the rest. Copies, not shared blocks: a sequence owns every
block it uses, so frees, preemption, moves and recovery need no reference counts, and the
scheduler's block count stays exact (holders count their blocks). Pins and copies ride on a
step as frees do, so every shard sees them in launch order: pins before the step's frees (a
pin may read a sequence that step frees), copies after (a re-prefilled id is freed first).

A holder is used only once the step carrying its pin completed on every shard (confirmed); a
failed step drops the holders it pinned or copied from (a shard missing one raises on the copy,
and that group is recomputed without it). Every change of the pipeline drops all holders. At
least MIN_PIECE tokens are left to prefill, the same piece length the scheduler never cuts
below, so a sequence's logits keep their bits (docs/design.md, "Batch-invariant numbers").
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_PIECE = 5          # tokens a copied-into prompt still prefills itself


@dataclass
class Holder:
    blocks: int          # whole blocks of the pinned prefix
    confirmed: bool      # its pin's step completed on every shard
    used: int            # tick of the last hit (least recently used goes first)


class PrefixCache:
    def __init__(self, block_size: int, max_holders: int = 16):
        self.block_size, self.max_holders = block_size, max_holders
        self.holders: dict[int, Holder] = {}
        self._keys: dict[tuple[int, ...], tuple[int, int]] = {}   # first 16 i tokens -> (holder, i)
        self._tick = 0
        self.hits = 0              # prompts that started after a copied prefix (the scheduler counts)
        self.tokens_copied = 0     # prompt tokens not recomputed

    @property
    def blocks_held(self) -> int:
        return sum(h.blocks for h in self.holders.values())

    def lookup(self, tokens: list[int], riding=frozenset()) -> tuple[int, int] | None:
        """(holder, blocks) of the longest confirmed cached prefix of tokens that leaves at least
        MIN_PIECE tokens to prefill, or None. `riding`: holders whose pins ride on the very step
        that would copy from them (a shard pins before it copies; a failed step drops both)."""
        bs = self.block_size
        for i in range((len(tokens) - MIN_PIECE) // bs, 0, -1):
            hit = self._keys.get(tuple(tokens[:i * bs]))
            if hit is not None and (self.holders[hit[0]].confirmed or hit[0] in riding):
                self._tick += 1
                self.holders[hit[0]].used = self._tick
                return hit
        return None

    def offer(self, prompt: list[int], new_id, room: int) -> tuple[int, int] | None:
        """A prefilled prompt: (holder id, blocks) to pin when it holds a block prefix no holder
        has yet and `room` free blocks take it (new_id() names the holder), else None."""
        bs = self.block_size
        j = (len(prompt) - MIN_PIECE) // bs
        if not 1 <= j <= room or tuple(prompt[:j * bs]) in self._keys or len(self.holders) >= self.max_holders:
            return None
        hid = new_id()
        self.holders[hid] = Holder(j, False, self._tick)
        for i in range(1, j + 1):
            self._keys.setdefault(tuple(prompt[:i * bs]), (hid, i))
        return hid, j

    def confirm(self, holder_ids) -> None:
        for hid in holder_ids:
            if hid in self.holders:
                self.holders[hid].confirmed = True

    def drop(self, holder_ids) -> list[int]:
        """Forget these holders; returns those that existed (the shards must free them)."""
        gone = [hid for hid in dict.fromkeys(holder_ids) if self.holders.pop(hid, None) is not None]
        if gone:
            self._keys = {k: v for k, v in self._keys.items() if v[0] in self.holders}
        return gone

    def evict(self, keep=()) -> int | None:
        """The least recently used holder not in keep, forgotten (free it), or None."""
        left = [(h.used, hid) for hid, h in self.holders.items() if hid not in keep]
        if not left:
            return None
        return self.drop([min(left)[1]])[0]

    def clear(self) -> list[int]:
        return self.drop(list(self.holders))
