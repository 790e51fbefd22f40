"""Tier 1: the prompt-prefix cache (serving/router/prefix.py) and its scheduler and KV sides: a prompt
that shares tokens with a pinned, confirmed prompt starts after the longest shared prefix, to the
token, with a copy; holders count their blocks, yield to requests, and drop with a failed group;
the KV copy moves every layer's blocks that hold the copied positions."""
import pytest
import torch

from serving.router.prefix import MIN_PIECE, PrefixCache, common_prefix
from serving.router.scheduler import Scheduler, SchedulerConfig, Sequence
from shards.model.kv_cache import PagedKV
from shards.model.step import SamplingParams

pytestmark = pytest.mark.unit

BS = 4
SYSTEM = list(range(100, 109))          # 9 shared tokens: two whole blocks of 4


def test_common_prefix_counts_to_the_token():
    a = list(range(40))
    for n in (0, 1, 15, 16, 17, 33, 40):
        assert common_prefix(a, a[:n] + [-1] * 5, block=16) == n
    assert common_prefix(a, a[:20], block=16) == 20 and common_prefix([], a) == 0


def test_lookup_takes_the_longest_confirmed_prefix_that_leaves_a_piece():
    c, ids = PrefixCache(BS), iter(range(-1, -100, -1))
    a = SYSTEM + [1, 2, 3, 4, 5, 6, 7]  # 16 tokens: the whole prompt is pinned, 4 blocks
    assert c.offer(a, lambda: next(ids), room=3) is None  # 4 blocks do not fit 3
    hid, n = c.offer(a, lambda: next(ids), room=4)
    assert n == len(a) and c.blocks_held == 4
    b = SYSTEM + [9] * 8
    assert c.lookup(b) is None                            # not confirmed: its pin may not have run
    c.confirm([hid])
    assert c.lookup(b) == (hid, 9)                        # SYSTEM, to the token
    assert c.lookup(SYSTEM[:4] + [0] * 9) == (hid, 4)
    assert c.lookup(SYSTEM[:8] + [0] * 4) == (hid, 7)     # 8 would leave 4 < MIN_PIECE tokens
    assert c.lookup(SYSTEM[:3] + [0] * 9) is None         # less than a block's worth
    assert c.lookup([0] * 20) is None
    assert c.offer(SYSTEM + [1] * 4, lambda: next(ids), 9) is None   # a holds all a repeat could copy
    longer = c.offer(a + [8] * 6, lambda: next(ids), 9)   # a chat's next turn: a holder of its own
    assert longer[1] == 22 and c.blocks_held == 4 + 6
    c.confirm([longer[0]])
    assert c.lookup(a + [8] * 6 + [3] * 9) == (longer[0], 22)
    assert c.drop([hid, longer[0], 12345]) == [hid, longer[0]] and c.lookup(b) is None and c.blocks_held == 0


def test_evict_goes_least_recently_used_first_and_spares_keep():
    c, ids = PrefixCache(BS), iter(range(-1, -100, -1))
    h1, _ = c.offer([1] * 4 + [0] * 6, lambda: next(ids), 9)
    h2, _ = c.offer([2] * 4 + [0] * 6, lambda: next(ids), 9)
    c.confirm([h1, h2])
    assert c.lookup([1] * 4 + [5] * 6) == (h1, 4)          # h1 used last
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
    (hid, src, n), = g2.pins
    assert src == 1 and n == 16 and hid < 0 and not g2.copies and not g2.prefill
    assert s.used_blocks == s.blocks(len(a.tokens)) + 4    # the holder's blocks count (a's in flight)
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
    assert g.copies == ((3, hid, 9),) and g.starts == (9,) and g.inputs == (tuple(c.tokens[9:]),)
    assert s.prefix.hits == 1 and s.prefix.tokens_copied == 9
    (b_hid, src, _), = g.pins                              # b's whole prompt rides on c's prefill
    assert src == 2 and b_hid != hid
    assert s.prefix_failed(g) == [b_hid, hid] and not s.prefix.holders   # a failed step drops both


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
    assert g2.prefill and g2.seq_ids == (2,) and g2.copies == ((2, hid, 9),) and g2.starts == (9,) and src == 1


def test_holders_yield_to_a_request_that_needs_their_blocks():
    s = Scheduler(SchedulerConfig(kv_blocks=9, block_size=BS, prefill_tokens=64))
    a = seq(1, SYSTEM + [1] * 7, max_tokens=2)
    s.add(a)
    g, _ = s.next_group()
    s.complete(g, [7])
    g, _ = s.next_group()
    (hid, _, _), = g.pins
    assert s.used_blocks == s.blocks(17) + 4
    s.complete(g, [7])                                    # a is done: only the holder holds blocks
    assert s.used_blocks == 4
    s.add(seq(2, list(range(200, 232))))                  # 32 tokens + 1: all 9 blocks
    g, freed = s.next_group()
    assert g.seq_ids == (2,) and freed == [hid]           # the shards free the holder first
    assert not s.prefix.holders and s.used_blocks == s.blocks(32)


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
    for dst_id, n in ((-1, 8), (-4, 6)):                   # whole blocks, and a block and a half
        kv.copy_prefix(dst_id, 1, n)
        src, dst = kv.table.blocks[1][:2], kv.table.blocks[dst_id]
        assert len(dst) == 2 and not set(dst) & set(kv.table.blocks[1]) and kv.table.lengths[dst_id] == n
        for kp, vp in kv.pools.values():
            assert torch.equal(kp[:, dst], kp[:, src]) and torch.equal(vp[:, dst], vp[:, src])
    with pytest.raises(KeyError, match="holds 10 tokens"):
        kv.copy_prefix(-2, 1, 11)
    with pytest.raises(KeyError, match="already holds"):
        kv.copy_prefix(-1, 1, 4)
    with pytest.raises(KeyError, match="holds 0 tokens"):
        kv.copy_prefix(-3, 99, 4)


def test_the_same_prompt_sent_at_once_is_prefilled_once():
    """n choices of one request (or one prompt sent twice together): the later ones wait for
    the first's prefill, then copy its pinned blocks in the step that carries the pin."""
    s = Scheduler(SchedulerConfig(kv_blocks=64, block_size=BS, prefill_tokens=64))
    prompt = SYSTEM + [1] * 7                              # 16 tokens: 11 can be copied
    a, b, c = seq(1, prompt), seq(2, prompt), seq(3, SYSTEM + [2] * 7)
    for x in (a, b, c):
        s.add(x)
    g1, _ = s.next_group()
    assert g1.seq_ids == (1, 3)                            # b waits behind a; c's prompt differs
    assert s.next_group()[0] is None                       # b still waits while a's prefill flies
    s.complete(g1, [7, 7])
    g2, _ = s.next_group()
    assert g2.prefill and g2.seq_ids == (2,) and g2.starts == (11,) and len(g2.inputs[0]) == MIN_PIECE
    assert {src for _, src, _ in g2.pins} == {1, 3}         # a's pin rides on the step that copies from it (c's too)
    (dst, hid, n), = g2.copies
    assert dst == 2 and n == len(prompt) - MIN_PIECE and hid in {h for h, _, _ in g2.pins}
    with_scores = Sequence(4, list(prompt), SamplingParams(max_tokens=2, prompt_logprobs=0), frozenset({0}))
    s.add(with_scores)
    s.complete(g2, [7])
    g3, _ = s.next_group()
    assert 4 not in g3.seq_ids or g3.starts[g3.seq_ids.index(4)] == 0   # scored prompts compute every position
