"""Tier 1: the prompt-prefix cache (serving/router/prefix.py) and its scheduler and KV sides: a prompt
after a pinned, confirmed block prefix starts after it with a copy; holders count their blocks,
yield to requests, and drop with a failed group; the KV copy moves every layer's blocks."""
import pytest
import torch

from serving.router.prefix import MIN_PIECE, PrefixCache
from serving.router.scheduler import Scheduler, SchedulerConfig, Sequence
from shards.model.kv_cache import PagedKV
from shards.model.step import SamplingParams

pytestmark = pytest.mark.unit

BS = 4
SYSTEM = list(range(100, 109))          # 9 shared tokens: two whole blocks of 4


def test_lookup_takes_the_longest_confirmed_prefix_that_leaves_a_piece():
    c, ids = PrefixCache(BS), iter(range(-1, -100, -1))
    a = SYSTEM + [1, 2, 3, 4, 5, 6, 7]  # 16 tokens: pins (16 - MIN_PIECE) // 4 = 2 blocks
    assert c.offer(a, lambda: next(ids), room=1) is None  # 2 blocks do not fit 1
    hid, blocks = c.offer(a, lambda: next(ids), room=2)
    assert blocks == (len(a) - MIN_PIECE) // BS == 2 and c.blocks_held == 2
    b = SYSTEM + [9] * 8
    assert c.lookup(b) is None                            # not confirmed: its pin may not have run
    c.confirm([hid])
    assert c.lookup(b) == (hid, 2)                        # both blocks are SYSTEM's
    assert c.lookup(SYSTEM[:4] + [0] * 9) == (hid, 1)     # the first block only
    assert c.lookup(SYSTEM[:8] + [0] * 4) == (hid, 1)     # 2 blocks would leave 4 < MIN_PIECE tokens
    assert c.lookup([0] * 20) is None
    assert c.offer(SYSTEM[:8] + [5] * 5, lambda: next(ids), 9) is None   # its 2 blocks are held already
    assert c.drop([hid, 12345]) == [hid] and c.lookup(b) is None and c.blocks_held == 0


def test_evict_goes_least_recently_used_first_and_spares_keep():
    c, ids = PrefixCache(BS), iter(range(-1, -100, -1))
    h1, _ = c.offer([1] * 4 + [0] * 6, lambda: next(ids), 9)
    h2, _ = c.offer([2] * 4 + [0] * 6, lambda: next(ids), 9)
    c.confirm([h1, h2])
    assert c.lookup([1] * 4 + [5] * 6) == (h1, 1)          # h1 used last
    assert c.evict(keep={h2}) == h1 and c.evict(keep={h2}) is None
    assert c.evict() == h2 and not c.holders


def seq(i, prompt, max_tokens=4):
    return Sequence(i, list(prompt), SamplingParams(max_tokens=max_tokens), frozenset({0}))


def test_a_second_prompt_copies_the_pinned_prefix_after_the_pin_ran():
    s = Scheduler(SchedulerConfig(kv_blocks=64, block_size=BS, prefill_tokens=64))
    a, b = seq(1, SYSTEM + [1] * 7), seq(2, SYSTEM + [2] * 7)
    s.add(a)
    g1, _ = s.next_group()
    assert g1.prefill and g1.seq_ids == (1,) and not g1.copies
    s.complete(g1, [7])                                   # a's prompt is in: its blocks get pinned
    g2, _ = s.next_group()                                # a's decode carries the pin
    (hid, src, blocks), = g2.pins
    assert src == 1 and blocks == 2 and hid < 0 and not g2.copies and not g2.prefill
    assert s.used_blocks == s.blocks(len(a.tokens)) + 2    # the holder's blocks count (a's in flight)
    s.add(b)
    g3, _ = s.next_group()                                # b prefills before the pin's step is back:
    assert g3.prefill and g3.seq_ids == (2,) and not g3.copies and g3.starts == (0,)   # no copy
    s.complete(g2, [7])
    s.complete(g3, [7])
    c = seq(3, SYSTEM + [3] * 7)
    s.add(c)
    while True:                                           # decodes of a, b first; then c
        g, _ = s.next_group()
        if g.prefill:
            break
        s.complete(g, [7] * len(g.seq_ids))
    assert g.copies == ((3, hid, 2),) and g.starts == (8,) and g.inputs == (tuple(c.tokens[8:]),)
    assert s.prefix.hits == 1 and s.prefix.tokens_copied == 8
    assert s.prefix_failed(g) == [hid] and not s.prefix.holders   # a failed copy drops its holder


def test_a_waiting_prompt_copies_a_pin_in_the_step_that_carries_it():
    """A prompt waiting when the pin is made: its prefill carries the pin and copies from it
    (each shard pins before it copies), rather than a decode carrying the pin."""
    s = Scheduler(SchedulerConfig(kv_blocks=64, block_size=BS, prefill_tokens=64, n_groups=1))
    a, b = seq(1, SYSTEM + [1] * 7), seq(2, SYSTEM + [2] * 7)
    s.add(a)
    g1, _ = s.next_group()
    s.add(b)
    s.complete(g1, [7])
    g2, _ = s.next_group()
    (hid, src, _), = g2.pins
    assert g2.prefill and g2.seq_ids == (2,) and g2.copies == ((2, hid, 2),) and g2.starts == (8,) and src == 1


def test_holders_yield_to_a_request_that_needs_their_blocks():
    s = Scheduler(SchedulerConfig(kv_blocks=8, block_size=BS, prefill_tokens=64))
    a = seq(1, SYSTEM + [1] * 7, max_tokens=2)
    s.add(a)
    g, _ = s.next_group()
    s.complete(g, [7])
    g, _ = s.next_group()
    (hid, _, _), = g.pins
    assert s.used_blocks == s.blocks(17) + 2
    s.complete(g, [7])                                    # a is done: only the holder holds blocks
    assert s.used_blocks == 2
    s.add(seq(2, list(range(200, 228))))                  # 28 tokens + 1: all 8 blocks
    g, freed = s.next_group()
    assert g.seq_ids == (2,) and freed == [hid]           # the shards free the holder first
    assert not s.prefix.holders and s.used_blocks == s.blocks(28)


def test_clear_prefixes_drops_pending_pins_too():
    s = Scheduler(SchedulerConfig(kv_blocks=64, block_size=BS, prefill_tokens=64))
    s.add(seq(1, SYSTEM + [1] * 7))
    g, _ = s.next_group()
    s.complete(g, [7])
    gone = s.clear_prefixes()
    assert len(gone) == 1 and s.used_blocks == s.blocks(16)
    g, _ = s.next_group()
    assert not g.pins


def test_off_means_no_pins_and_no_copies():
    s = Scheduler(SchedulerConfig(kv_blocks=64, block_size=BS, prefill_tokens=64, prefix_cache=False))
    for i in range(3):
        s.add(seq(i, SYSTEM + [i] * 7))
    for _ in range(20):
        g, _ = s.next_group()
        if g is None:
            break
        assert not g.pins and not g.copies and (not g.prefill or set(g.starts) == {0})
        s.complete(g, [7] * len(g.seq_ids))


def test_kv_copy_prefix_copies_every_layer_and_refuses_what_is_not_held():
    kv = PagedKV([0, 3], n_blocks=8, block_size=BS, n_kv=2, head_dim=4)
    kv.table.reserve(1, 10)                               # 3 blocks
    for layer, (kp, vp) in kv.pools.items():
        kp.normal_()
        vp.normal_()
    kv.copy_prefix(-1, 1, 2)
    src, dst = kv.table.blocks[1][:2], kv.table.blocks[-1]
    assert len(dst) == 2 and not set(dst) & set(kv.table.blocks[1]) and kv.table.lengths[-1] == 8
    for kp, vp in kv.pools.values():
        assert torch.equal(kp[:, dst], kp[:, src]) and torch.equal(vp[:, dst], vp[:, src])
    with pytest.raises(KeyError, match="holds 10 tokens"):
        kv.copy_prefix(-2, 1, 3)
    with pytest.raises(KeyError, match="already holds"):
        kv.copy_prefix(-1, 1, 1)
    with pytest.raises(KeyError, match="holds 0 tokens"):
        kv.copy_prefix(-3, 99, 1)


def test_the_same_prompt_sent_at_once_is_prefilled_once():
    """n choices of one request (or one prompt sent twice together): the later ones wait for
    the first's prefill, then copy its pinned blocks in the step that carries the pin."""
    s = Scheduler(SchedulerConfig(kv_blocks=64, block_size=BS, prefill_tokens=64))
    prompt = SYSTEM + [1] * 7                              # 16 tokens: 2 whole blocks can be copied
    a, b, c = seq(1, prompt), seq(2, prompt), seq(3, SYSTEM + [2] * 7)
    for x in (a, b, c):
        s.add(x)
    g1, _ = s.next_group()
    assert g1.seq_ids == (1, 3)                            # b waits behind a; c's prompt differs
    assert s.next_group()[0] is None                       # b still waits while a's prefill flies
    s.complete(g1, [7, 7])
    g2, _ = s.next_group()
    assert g2.prefill and g2.seq_ids == (2,) and g2.starts == (8,) and len(g2.inputs[0]) == len(prompt) - 8
    assert {src for _, src, _ in g2.pins} == {1}            # a's pin rides on the step that copies from it
    (dst, hid, blocks), = g2.copies
    assert dst == 2 and blocks == 2 and hid in {h for h, _, _ in g2.pins}
    with_scores = Sequence(4, list(prompt), SamplingParams(max_tokens=2, prompt_logprobs=0), frozenset({0}))
    s.add(with_scores)
    s.complete(g2, [7])
    g3, _ = s.next_group()
    assert 4 not in g3.seq_ids or g3.starts[g3.seq_ids.index(4)] == 0   # scored prompts compute every position
