"""Rotary position embedding: cos and sin per absolute position, as transformers computes them,
kept in a table that grows with the longest position a stage has seen.

Why a table: a step looked its RoPE up by computing it, six torch ops (product, concatenation,
cos, sin, scale, cast), each paid cold between two steps of a served shard (its caches hold the
other process's work by then). One index per table replaces them. Every value is the same
elementwise function of the position, computed the same way (fp32 product, cos / sin, scale,
cast to the KV dtype), so a table row equals what the step computed (tests/test_rope.py).
"""
from __future__ import annotations

import numpy as np
import torch

from shards import compat

GROW_ROWS = 1024     # the tables grow by this many positions at a time: 512 KiB at head_dim 64
                     # in fp32, 2% of what those positions' K and V take in 15 of the default
                     # model's layers
CHUNK_ROWS = 256     # positions computed per batch of ops: below torch's parallel grain, so one
                     # thread runs each op over whole vectors, as a step's own [B, Q, head_dim] did


def rope_params(cfg, device) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] fp32, attention scaling) as transformers computes them."""
    rot = compat.llama_rotary_embedding()(cfg)
    # a plain tensor, not a registered buffer
    return torch.tensor(rot.inv_freq.tolist(), dtype=torch.float32, device=device), float(rot.attention_scaling)


def rope_rows(pos: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [..., head_dim] of integer positions [...]: transformers' formula."""
    freqs = pos.unsqueeze(-1).float() * inv_freq                      # [..., head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return tuple((f(emb) * scale).to(dtype) for f in (torch.cos, torch.sin))


class Rope:
    """cos and sin tables [positions, head_dim] in the KV dtype, on the stage's device."""

    def __init__(self, inv_freq: torch.Tensor, scale: float, dtype, device):
        self.inv_freq, self.scale, self.dtype, self.device = inv_freq.to(device), scale, dtype, device
        self.cos = self.sin = torch.empty(0, 2 * inv_freq.numel(), dtype=dtype, device=device)
        self._host: tuple[np.ndarray, ...] = ()   # CPU: numpy views of cos, sin (after the first growth)

    @classmethod
    def of(cls, cfg, dtype, device) -> "Rope":
        return cls(*rope_params(cfg, device), dtype, device)

    @property
    def rows(self) -> int:
        """Positions the tables hold."""
        return self.cos.shape[0]

    def at(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, Q, 1, head_dim] of positions pos [B, Q] (int64): broadcast over the
        heads axis of [B, Q, heads, head_dim]."""
        top = int(pos.max()) + 1 if pos.size else 0
        if top > self.rows:
            self._grow(top)
        if self._host:   # numpy's indexing: ~1 us a table where torch's advanced indexing took ~10
            return tuple(torch.from_numpy(t[pos]).view(self.dtype).unsqueeze(2) for t in self._host)
        idx = torch.from_numpy(pos).to(self.device)
        return self.cos[idx].unsqueeze(2), self.sin[idx].unsqueeze(2)

    def _grow(self, top: int) -> None:
        """Append rows up to the next multiple of GROW_ROWS positions >= top."""
        n = -(-top // GROW_ROWS) * GROW_ROWS
        parts = [rope_rows(torch.arange(a, min(a + CHUNK_ROWS, n), device=self.device), self.inv_freq,
                           self.scale, self.dtype) for a in range(self.rows, n, CHUNK_ROWS)]
        self.cos, self.sin = (torch.cat([t, *(p[i] for p in parts)]) for i, t in enumerate((self.cos, self.sin)))
        if torch.device(self.device).type == "cpu":   # the tables' bits as integers numpy can hold
            as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[self.cos.element_size()]
            self._host = tuple(t.view(as_int).numpy() for t in (self.cos, self.sin))
