"""RoPE tables and the per-step context built from them (shards/model/rope.py, step_context.py)."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from shards.model.kv_cache import PagedKV
from shards.model.rope import CHUNK_ROWS, GROW_ROWS, Rope, rope_params, rope_rows
from shards.model.step import StepBatch
from shards.model.step_context import MIN_BLOCKS, StepContext

pytestmark = pytest.mark.unit

# the default model's RoPE (head_dim 64, theta 100000) and a scaled one whose attention
# scaling is not 1 (YaRN), so the scale's product is exercised
CFGS = [LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
        LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    max_position_embeddings=4096,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_rows_are_the_formula_at_every_shape_a_step_has(cfg, dtype):
    inv_freq, scale = rope_params(cfg, "cpu")
    rope = Rope(inv_freq, scale, dtype, "cpu")
    gen = np.random.default_rng(0)
    # a decode step of 5 sequences, a prefill chunk of 256, and positions past one growth
    for pos in (gen.integers(0, 3000, (5, 1)), np.arange(700, 956)[None], gen.integers(0, 2 * GROW_ROWS + 5, (3, 40))):
        cos, sin = rope.at(pos)
        want = rope_rows(torch.from_numpy(pos), inv_freq, scale, dtype)
        assert cos.shape == sin.shape == (*pos.shape, 1, inv_freq.numel() * 2)
        assert torch.equal(cos[:, :, 0], want[0]) and torch.equal(sin[:, :, 0], want[1])
    assert rope.rows % GROW_ROWS == 0 and rope.rows >= 3000
    if scale != 1.0:
        assert not torch.equal(rope.cos[:10], rope_rows(torch.arange(10), inv_freq, 1.0, dtype)[0])


def test_tables_grow_by_whole_chunks_and_keep_their_rows():
    rope = Rope.of(CFGS[0], torch.float32, "cpu")
    rope.at(np.array([[3]]))
    assert rope.rows == GROW_ROWS and GROW_ROWS % CHUNK_ROWS == 0
    first = rope.cos.clone()
    rope.at(np.array([[GROW_ROWS], [5]]))
    assert rope.rows == 2 * GROW_ROWS
    assert torch.equal(rope.cos[:GROW_ROWS], first)


def test_decode_context_bias_lengths_and_slots():
    kv = PagedKV([0], 16, 4, 3, 64)
    rope = Rope.of(CFGS[0], torch.float32, "cpu")
    StepContext(StepBatch([7, 8], [0, 0], [9, 2]), kv, rope)     # prompts of 9 and 2 tokens
    ctx = StepContext(StepBatch([7, 8], [9, 2], [1, 1]), kv, rope)
    nb = max(MIN_BLOCKS, 3)
    assert ctx.block_ids.tolist() == [kv.table.blocks[7] + [16] * (nb - 3), kv.table.blocks[8] + [16] * (nb - 1)]
    assert ctx.slots.tolist() == [kv.table.blocks[7][2] * 4 + 1, kv.table.blocks[8][0] * 4 + 2]
    assert ctx.decode_lens.tolist() == [10, 3] and ctx.decode_lens.dtype == torch.long
    bias = ctx.decode_bias
    assert bias.shape == (2, 1, nb * 4) and bias.dtype == torch.float32
    assert (bias[0, 0, :10] == 0).all() and torch.isinf(bias[0, 0, 10:]).all()
    assert (bias[1, 0, :3] == 0).all() and torch.isinf(bias[1, 0, 3:]).all()
    assert ctx.rope[0].shape == (2, 1, 1, 64) and ctx.last.tolist() == [0, 0]


def test_prefill_mask_is_causal_and_padded_queries_see_key_zero():
    kv = PagedKV([0], 16, 4, 3, 64)
    ctx = StepContext(StepBatch([1, 2], [0, 0], [3, 1]), kv, Rope.of(CFGS[0], torch.float32, "cpu"))
    m = ctx.mask[:, 0]                                            # [B, Q, T]
    assert m.shape == (2, 3, MIN_BLOCKS * 4) and m.dtype == torch.bool
    assert m[0, :, :4].tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, False]]
    assert m[1, 0, :2].tolist() == [True, False]
    assert m[1, 1:].sum(-1).tolist() == [1, 1] and m[1, 1:, 0].all()   # padding: key 0 alone
    assert ctx.last.tolist() == [2, 0]
    assert len(ctx.slots) == 6 and ctx.slots[4:].tolist() == [kv.scratch_slot] * 2
