"""Tier 1: the paged decode attention kernel (shards/model/attention.py) against the gather path
(block.decode_attention) over the same pool: every group and head size it has a template for,
KV lengths on and off block edges, scattered blocks, and nothing read past a sequence's length."""
import pytest
import torch

from shards.model import attention
from shards.model.block import decode_attention

pytestmark = pytest.mark.model

BS = 16


def case(g: int, nkv: int, hd: int, lens: list[int], n_blocks: int = 64, seed: int = 0):
    """q, pools, block ids (scattered), lens, and the additive bias of the gather path."""
    gen = torch.Generator().manual_seed(seed)
    kp, vp = (torch.randn(nkv, n_blocks + 1, BS, hd, generator=gen) for _ in range(2))
    nb = max(2, max(-(-n // BS) for n in lens))
    perm, at = torch.randperm(n_blocks, generator=gen), 0
    ids = torch.full((len(lens), nb), n_blocks, dtype=torch.long)    # padded with the scratch block
    for b, n in enumerate(lens):
        k = -(-n // BS)
        ids[b, :k], at = perm[at:at + k], at + k
    key_pos = torch.arange(nb * BS).view(1, 1, -1)
    lens_t = torch.tensor(lens)
    bias = torch.zeros(len(lens), 1, nb * BS).masked_fill_(key_pos >= lens_t.view(-1, 1, 1), float("-inf"))
    q = torch.randn(len(lens), g * nkv, hd, generator=gen)
    return q, kp, vp, ids, lens_t, bias


def reference(q, kp, vp, ids, bias):
    nkv, hd = kp.shape[0], kp.shape[-1]
    shape = (nkv, ids.shape[0], ids.shape[1] * BS, hd)
    return decode_attention(q, kp[:, ids].view(shape), vp[:, ids].view(shape), bias)


needs_kernel = pytest.mark.skipif(not attention.available(), reason="no C++ compiler for the kernel")


@needs_kernel
@pytest.mark.parametrize("hd", [16, 32, 64, 128])
@pytest.mark.parametrize("g", [1, 3, 8])
def test_kernel_equals_the_gather_path(g, hd):
    q, kp, vp, ids, lens, bias = case(g, 2, hd, [1, 15, 16, 17, 100, 311])
    assert attention.supports(kp, g * 2, 2)
    got = torch.ops.shardserve.paged_decode_attention(q, kp, vp, ids, lens, hd ** -0.5)
    assert (got - reference(q, kp, vp, ids, bias)).abs().max().item() < 2e-6


@needs_kernel
def test_kernel_reads_only_each_sequences_keys():
    q, kp, vp, ids, lens, bias = case(3, 3, 64, [5, 40, 33])
    want = reference(q, kp, vp, ids, bias)
    # NaN everywhere a sequence does not own: past its length, in the scratch block, in free blocks
    used = torch.zeros(kp.shape[1] * BS, dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        used[ids[b, pos // BS] * BS + pos % BS] = True
    for pool in (kp, vp):
        pool.view(pool.shape[0], -1, pool.shape[-1])[:, ~used] = float("nan")
    got = torch.ops.shardserve.paged_decode_attention(q, kp, vp, ids, lens, 64 ** -0.5)
    assert (got - want).abs().max().item() < 2e-6


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    q, kp, vp, ids, lens, _ = case(3, 3, 64, [200, 17, 64, 90])
    was = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.shardserve.paged_decode_attention(q, kp, vp, ids, lens, 0.125))
    finally:
        torch.set_num_threads(was)
    assert torch.equal(*outs)      # one (sequence, head) per job: the same sums whatever the split


@needs_kernel
def test_long_sequences_in_segments_equal_the_gather_path():
    """Past 512 keys a sequence is attended in segments whose partial softmaxes are combined."""
    lens = [512, 513, 1100, 2000, 40]
    q, kp, vp, ids, lens, bias = case(3, 3, 64, lens, n_blocks=sum(-(-n // BS) for n in lens) + 4, seed=3)
    got = torch.ops.shardserve.paged_decode_attention(q, kp, vp, ids, lens, 0.125)
    assert (got - reference(q, kp, vp, ids, bias)).abs().max().item() < 2e-6


@needs_kernel
def test_a_step_on_the_kernels_team_splits_its_segments_and_keeps_the_bits():
    """On one torch thread with the 4-bit kernel's team lending (no other shard steps here), the
    helpers take some of a long sequence's segments; the bits are those of the thread alone."""
    from shards.compress import qmatmul
    qmatmul._kernel()
    lens = [8000, 300]
    q, kp, vp, ids, lens, _ = case(3, 3, 64, lens, n_blocks=sum(-(-n // BS) for n in lens) + 4, seed=4)
    op, was = torch.ops.shardserve.paged_decode_attention, torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = op(q, kp, vp, ids, lens, 0.125)
        attention.use_team(qmatmul.team_hooks())
        before, outs = qmatmul.lent(), []
        with qmatmul.lend(2):
            for _ in range(5):
                outs.append(op(q, kp, vp, ids, lens, 0.125))
                if qmatmul.lent() > before:
                    break
        assert qmatmul.lent() > before, "no segment ran on a helper"
        assert all(torch.equal(alone, o) for o in outs)
    finally:
        attention.use_team(None)
        torch.set_num_threads(was)


@needs_kernel
def test_lengths_or_blocks_out_of_bounds_raise_instead_of_reading():
    q, kp, vp, ids, lens, _ = case(3, 3, 64, [20, 40])
    op = torch.ops.shardserve.paged_decode_attention
    for bad_lens, bad_ids in [([20, ids.shape[1] * BS + 1], ids), ([0, 40], ids),
                              ([20, 40], ids.masked_fill(ids == ids[1, 2], kp.shape[1])),
                              ([20, 40], ids.masked_fill(ids == ids[0, 0], -1))]:
        with pytest.raises((ValueError, RuntimeError), match="outside"):   # RuntimeError: from the C++ kernel
            op(q, kp, vp, bad_ids, torch.tensor(bad_lens), 0.125)


def test_shapes_without_a_template_take_the_gather_path():
    kp = torch.zeros(2, 9, BS, 24)
    assert not attention.supports(kp, 4, 2)                       # head_dim 24
    assert not attention.supports(torch.zeros(2, 9, BS, 64), 18, 2)   # group of 9
    assert not attention.supports(torch.zeros(2, 9, BS, 64, dtype=torch.bfloat16), 4, 2)
    assert not attention.supports(torch.zeros(2, 9, 8, 64), 4, 2)    # blocks of 8 keys


@needs_kernel
@pytest.mark.parametrize("hd", [16, 64, 128])
@pytest.mark.parametrize("g", [1, 3])
def test_8_and_16_lane_paths_give_the_same_bits(g, hd):
    """attend (16 lanes, AVX-512 CPUs) and attend8 (8 lanes, the others) built side by side: the
    same sums in the same order, so a sequence's bits do not depend on the node's CPU."""
    import ctypes

    from shards.runtime import kernels
    q, kp, vp, ids, lens, _ = case(g, 2, hd, [1, 15, 16, 17, 100, 311, 700], n_blocks=128, seed=5)
    outs = []
    for flag, lanes in (("-DSHARDSERVE_ATTN8", 8), ("-DSHARDSERVE_ATTN16", 16)):
        lib = kernels.load(attention.SOURCE, (flag,))
        assert lib.paged_decode_attention_lanes() == lanes
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.paged_decode_attention.argtypes = [p] * 6 + [i64] * 6 + [ctypes.c_float, ctypes.c_int]
        out = torch.empty_like(q)
        assert lib.paged_decode_attention(q.data_ptr(), kp.data_ptr(), vp.data_ptr(), ids.data_ptr(),
                                          lens.data_ptr(), out.data_ptr(), *q.shape[:2], kp.shape[0], hd,
                                          ids.shape[1], kp.shape[1], hd ** -0.5, 1) == 0
        outs.append(out)
    assert torch.equal(*outs)
    assert torch.equal(outs[0], torch.ops.shardserve.paged_decode_attention(q, kp, vp, ids, lens, hd ** -0.5))
