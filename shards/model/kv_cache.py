"""Paged per-sequence KV cache for the layers one stage owns.

Block bookkeeping (`BlockTable`) is pure Python; `PagedKV` holds the tensors. Every layer of a
stage shares one block table per sequence, so a sequence costs the same blocks on every layer,
and the router can count capacity in blocks without asking the shard.
"""
from __future__ import annotations

import math

import torch

from shards.errors import KVCacheFull


class BlockTable:
    """Which pool blocks each live sequence owns. Pure bookkeeping, no tensors."""

    def __init__(self, n_blocks: int, block_size: int):
        self.n_blocks, self.block_size = n_blocks, block_size
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # tokens whose K/V are stored, per sequence

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def reserve(self, seq_id: int, new_len: int) -> None:
        """Grow seq_id's blocks to hold new_len tokens, or raise KVCacheFull (nothing changes)."""
        owned = self.blocks.setdefault(seq_id, [])
        need = self.blocks_for(new_len) - len(owned)
        if need > len(self._free):
            if not owned:
                del self.blocks[seq_id]
            raise KVCacheFull(
                f"KV pool full: sequence {seq_id} needs {need} more blocks of {self.block_size} "
                f"tokens for {new_len} tokens, {len(self._free)} of {self.n_blocks} free")
        owned.extend(self._free.pop() for _ in range(max(need, 0)))
        self.lengths[seq_id] = new_len

    def slots(self, seq_id: int, start: int, count: int) -> list[int]:
        """Flat pool slot of each token position start..start+count-1 of seq_id."""
        owned, bs = self.blocks[seq_id], self.block_size
        return [owned[p // bs] * bs + p % bs for p in range(start, start + count)]

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self.blocks.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self._free)


def write_slots(pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """pool: [n_kv, blocks, block_size, head_dim], written in place at flat slots [T] with
    x [T, n_kv, head_dim]."""
    pool.view(pool.shape[0], -1, pool.shape[3]).index_copy_(1, slots, x.transpose(0, 1).to(pool.dtype))


class PagedKV:
    """K and V pools per layer: [n_kv_heads, n_blocks + 1, block_size, head_dim].

    Head-major, so a gather hands decode attention [n_kv, B, T, head_dim] contiguous per head
    and its batched matmuls need no copy. The extra last block is scratch: padded query
    positions write there, never into a sequence's blocks.
    """

    def __init__(self, layers, n_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        self.table = BlockTable(n_blocks, block_size)
        self.shape = (n_kv, n_blocks + 1, block_size, head_dim)
        self.dtype, self.device = dtype, device
        self.pools: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in layers:
            self.add_layer(layer)

    @property
    def scratch_slot(self) -> int:
        return self.table.n_blocks * self.table.block_size

    def add_layer(self, layer: int) -> None:
        # written at once, so the reserved pool is resident now (as the plan counts it), not
        # lazily on first use, when the OS might no longer have the pages
        self.pools[layer] = tuple(torch.empty(self.shape, dtype=self.dtype, device=self.device).zero_()
                                  for _ in range(2))

    def drop_layer(self, layer: int) -> None:
        del self.pools[layer]

    def bytes_reserved(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.pools.values())

    def bytes_used(self) -> int:
        per_block = self.bytes_reserved() // self.shape[1]
        return self.table.used_blocks * per_block

    def _flat(self, pool: torch.Tensor) -> torch.Tensor:
        return pool.view(self.shape[0], -1, self.shape[3])            # [n_kv, slots, head_dim]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots: [T] flat slot ids; k, v: [T, n_kv, head_dim]."""
        kp, vp = self.pools[layer]
        write_slots(kp, slots, k)
        write_slots(vp, slots, v)

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids: [B, nb] -> K, V as [n_kv, B, nb * block_size, head_dim] (contiguous)."""
        kp, vp = self.pools[layer]
        b, nb = block_ids.shape
        shape = (self.shape[0], b, nb * self.shape[2], self.shape[3])
        return kp[:, block_ids].view(shape), vp[:, block_ids].view(shape)

    def copy_prefix(self, dst: int, src: int, n_tokens: int) -> None:
        """Give dst, which holds nothing, a copy of src's K/V for its first n_tokens positions in
        every layer (a cached prompt prefix, serving/router/prefix.py): the blocks holding them,
        whole, so dst's last block may hold src's later positions, which dst's next step writes
        over (attention reads only positions before a query's). Raises KeyError when src holds
        fewer tokens, and KVCacheFull when the pool has no room (nothing changes then)."""
        have = self.table.blocks.get(src, [])
        if self.table.lengths.get(src, 0) < n_tokens:
            raise KeyError(f"prefix copy: sequence {src} holds {self.table.lengths.get(src, 0)} tokens on "
                           f"this shard, {n_tokens} to copy into {dst}")
        if dst in self.table.blocks:
            raise KeyError(f"prefix copy: sequence {dst} already holds {self.table.lengths[dst]} tokens")
        self.table.reserve(dst, n_tokens)
        s = torch.tensor(have[:self.table.blocks_for(n_tokens)], device=self.device)
        d = torch.tensor(self.table.blocks[dst], device=self.device)
        for kp, vp in self.pools.values():
            kp[:, d] = kp[:, s]
            vp[:, d] = vp[:, s]

    def export(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's stored K/V of one layer: [length, n_kv, head_dim] each (for moves)."""
        n = self.table.lengths[seq_id]
        slots = torch.tensor(self.table.slots(seq_id, 0, n), dtype=torch.long, device=self.device)
        kp, vp = self.pools[layer]
        return tuple(self._flat(p)[:, slots].transpose(0, 1).contiguous().cpu() for p in (kp, vp))

    def import_(self, seq_id: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store exported K/V for seq_id, whose block table must already hold len(k) tokens."""
        slots = torch.tensor(self.table.slots(seq_id, 0, k.shape[0]), dtype=torch.long, device=self.device)
        self.write(layer, slots, k.to(self.device), v.to(self.device))
