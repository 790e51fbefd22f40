"""Per-step tensors every layer of a stage shares: slot ids, block ids, attention mask and bias,
RoPE. Built once per step from the StepBatch and the stage's KV block table.

The integer bookkeeping (positions, masks, lengths) is numpy, turned into tensors at the end:
built between two steps of a served shard, each torch op ran with the other process's work in
the caches, and a decode step's context took ~13% of a 19-layer stage's step as ~20 torch ops.
"""
from __future__ import annotations

import numpy as np
import torch

from shards.model.kv_cache import PagedKV
from shards.model.rope import Rope
from shards.model.step import StepBatch

MIN_BLOCKS = 2     # KV blocks every sequence of a step is padded to at least


class StepContext:
    """Per-step tensors every layer shares: slot ids, block ids, attention mask, RoPE."""

    def __init__(self, batch: StepBatch, kv: PagedKV, rope: Rope):
        table, width, dev = kv.table, batch.width, kv.device
        slots, blocks = [], []
        for sid, start, n in zip(batch.seq_ids, batch.starts, batch.q_lens):
            table.reserve(sid, start + n)
            slots += table.slots(sid, start, n) + [kv.scratch_slot] * (width - n)
            blocks.append(table.blocks[sid])
        # at least MIN_BLOCKS (padded with the masked scratch block): the compiled decode graph
        # is dynamic in the KV length, and a length of one block would need a graph of its own
        nb = max(MIN_BLOCKS, *(len(b) for b in blocks))
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.block_ids = torch.tensor([b + [table.n_blocks] * (nb - len(b)) for b in blocks], device=dev)
        starts, q_lens = np.array(batch.starts, dtype=np.int64), np.array(batch.q_lens, dtype=np.int64)
        pos = starts[:, None] + np.arange(width)                       # [B, Q] absolute positions
        key_pos = np.arange(nb * table.block_size)                     # [T]
        # a query sees keys up to its own position
        sees = key_pos <= pos[:, :, None]                              # [B, Q, T]
        if width == 1:                                                 # decode: additive bias, lengths
            bias = _tensor(np.where(sees, np.float32(0), np.float32(-np.inf)), dev)
            self.decode_bias = bias if bias.dtype == kv.dtype else bias.to(kv.dtype)
            self.decode_lens = _tensor(starts + 1, dev)                # [B] keys each query sees
            self.mask = None                                           # decode reads the two above
        else:                                                          # padded queries see key 0 (never NaN)
            valid_q = np.arange(width) < q_lens[:, None]               # [B, Q]
            sees &= valid_q[:, :, None]
            sees[..., 0] |= ~valid_q
            self.mask = _tensor(sees, dev).unsqueeze(1)                # [B, 1, Q, T]
        self.rope = rope.at(pos)                                       # [B, Q, 1, head_dim] each
        self.last = _tensor(q_lens - 1, dev)                           # [B] last real position


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    """A torch tensor of a numpy array on device (the CPU: the array's own memory)."""
    return torch.from_numpy(a).to(device)


def dummy_decode(b: int, nb: int, hidden: int, head_dim: int, scratch_block: int, block_size: int, dtype, device):
    """(x, slots, block_ids, bias, lens, cos, sin) of a decode step of b sequences over nb
    blocks, all pointing at the pool's scratch block."""
    x = torch.zeros(b, hidden, dtype=dtype, device=device)
    slots = torch.full((b,), scratch_block * block_size, dtype=torch.long, device=device)
    block_ids = torch.full((b, nb), scratch_block, dtype=torch.long, device=device)
    bias = torch.zeros(b, 1, nb * block_size, dtype=dtype, device=device)
    lens = torch.full((b,), block_size, dtype=torch.long, device=device)
    cos, sin = (torch.ones(b, 1, head_dim, dtype=dtype, device=device) for _ in range(2))  # distinct:
    return x, slots, block_ids, bias, lens, cos, sin      # dynamo would guard on `cos is sin`
