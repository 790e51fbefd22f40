"""Per-step tensors every layer of a stage shares: slot ids, block ids, attention mask and bias,
RoPE. Built once per step from the StepBatch and the stage's KV block table."""
from __future__ import annotations

import torch

from shards import compat
from shards.model.kv_cache import PagedKV
from shards.model.step import StepBatch


def rope_params(cfg, device) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] fp32, attention scaling) as transformers computes them."""
    rot = compat.llama_rotary_embedding()(cfg)
    # a plain tensor, not a registered buffer
    return torch.tensor(rot.inv_freq.tolist(), dtype=torch.float32, device=device), float(rot.attention_scaling)


MIN_BLOCKS = 2     # KV blocks every sequence of a step is padded to at least


class StepContext:
    """Per-step tensors every layer shares: slot ids, block ids, attention mask, RoPE."""

    def __init__(self, batch: StepBatch, kv: PagedKV, inv_freq: torch.Tensor, rope_scale: float):
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
        starts = torch.tensor(batch.starts, device=dev).unsqueeze(1)
        pos = starts + torch.arange(width, device=dev).unsqueeze(0)   # [B, Q] absolute positions
        key_pos = torch.arange(nb * table.block_size, device=dev)     # [T]
        q_lens = torch.tensor(batch.q_lens, device=dev)
        valid_q = torch.arange(width, device=dev).unsqueeze(0) < q_lens.unsqueeze(1)
        # a query sees keys up to its own position; padded queries see key 0 (never NaN)
        mask = (key_pos.view(1, 1, -1) <= pos.unsqueeze(-1)) & valid_q.unsqueeze(-1)
        mask[..., 0] |= ~valid_q
        self.mask = mask.unsqueeze(1)                                  # [B, 1, Q, T]
        if width == 1:                                                 # decode: additive mask
            self.decode_bias = torch.zeros(mask.shape, dtype=kv.dtype, device=dev).masked_fill_(
                ~mask, float("-inf"))                                  # [B, 1, T]
            self.decode_lens = starts[:, 0] + 1                        # [B] keys each query sees
        freqs = pos.unsqueeze(-1).float() * inv_freq                   # [B, Q, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        # [B, Q, 1, head_dim]: broadcast over the heads axis of [B, Q, heads, head_dim]
        self.rope = tuple((f(emb) * rope_scale).unsqueeze(2).to(kv.dtype) for f in (torch.cos, torch.sin))
        self.last = q_lens - 1                                         # [B] last real position
