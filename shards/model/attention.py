"""Decode attention that reads the paged KV pool in place: a C++ kernel (shards/model/attention.cpp),
built with the node's C++ compiler at first use and cached, called as the torch op
`shardserve::paged_decode_attention` so the compiled decode graph (shards/model/compiled.py) can hold it.

Why a kernel of our own: inductor's fused reductions over indexed pool elements (compiled.py's
formulation without it) ran at ~10 GMAC/s and stalled on every scattered 4 KiB block. Measured
on this 2-core VM, 1 thread, 3 KV heads x 3 queries x 64 dims: alone, pools of 15 layers cycled,
~280 keys a sequence, blocks in order, us a layer at batch 1 / 16 / 32: 141-151 / 1031-1080 /
2127-2133 against 42-43 / 397-481 / 905-912. Inside the compiled step (layers [0, 15),
w8a8, 300 keys, torch.profiler over 5 steps): batch 16 584 us a call against 868 for the
fused loop (with its neighbouring ops), the whole step 27.4 against 32.1 ms; batch 1 at 2
threads 28-36 against 41-42 us. Both keep fp32 throughout; outputs agree to ~4e-7 (the kernel
sums in another order and uses a polynomial exp).

`supports()` is False for CUDA pools, bf16 KV, a group or head size without a template, and
where the kernel is not `available()` (no compiler: logged once): the callers then take the
gather path (eager) or inductor's reductions (compiled). SHARDSERVE_ATTENTION_KERNEL=0 turns the
kernel off (A/B runs).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

from shards.runtime import kernels, ops

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.cpp")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel, or None (switched off, or no compiler: logged once)."""
    if os.environ.get("SHARDSERVE_ATTENTION_KERNEL", "1") == "0":
        return None
    try:
        lib = kernels.load(SOURCE)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("decode attention kernel unavailable, decode gathers the KV instead: %s", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.paged_decode_attention.argtypes = [p] * 6 + [i64] * 6 + [ctypes.c_float, ctypes.c_int]
    lib.paged_decode_attention_supports.argtypes = [i64, i64]
    lib.paged_decode_attention_team.argtypes = [p, p]
    ops.register(_LIB, "paged_decode_attention", lib.paged_decode_attention, paged_decode_attention)
    return lib


def use_team(hooks: tuple[int, int] | None) -> None:
    """Split the jobs of a decode step that runs on one torch thread over the 4-bit kernel's team
    while it is on (hooks: shards/compress/qmatmul.py::team_hooks); None: never.
    SHARDSERVE_ATTENTION_TEAM=0 keeps every such step on its thread (A/B runs)."""
    lib = _library()
    if lib is not None:
        on = hooks is not None and os.environ.get("SHARDSERVE_ATTENTION_TEAM", "1") != "0"
        lib.paged_decode_attention_team(*(hooks if on else (None, None)))


def available() -> bool:
    return _library() is not None


def supports(pool: torch.Tensor, n_heads: int, n_kv: int) -> bool:
    """Whether the kernel serves decode attention over this pool for this head layout. Asked
    per layer and step: the answer for a layout is computed once."""
    return _supports(pool.device.type, pool.dtype, pool.is_contiguous(), pool.shape[2], pool.shape[-1],
                     n_heads, n_kv)


@functools.cache
def _supports(device: str, dtype: torch.dtype, contiguous: bool, block_size: int, head_dim: int,
              n_heads: int, n_kv: int) -> bool:
    if device != "cpu" or dtype != torch.float32 or not contiguous or n_heads % n_kv or block_size != 16:
        return False                   # checked first: a GPU node never builds the CPU kernel
    lib = _library()
    return lib is not None and bool(lib.paged_decode_attention_supports(n_heads // n_kv, head_dim))


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_ids: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, heads, hd] fp32; k_pool, v_pool: [kv_heads, blocks, 16, hd] (contiguous);
    block_ids: [B, nb] int64; lens: [B] int64, the keys each sequence attends (its first lens[b]
    positions). Returns [B, heads, hd]. Only where supports() said so."""
    q, block_ids, lens = q.contiguous(), block_ids.contiguous(), lens.contiguous()
    out = torch.empty_like(q)
    b, nh, hd = q.shape
    rc = _library().paged_decode_attention(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), block_ids.data_ptr(), lens.data_ptr(),
        out.data_ptr(), b, nh, k_pool.shape[0], hd, block_ids.shape[1], k_pool.shape[1], scale,
        torch.get_num_threads())
    if rc == -1:
        raise ValueError(f"paged_decode_attention has no kernel for {nh} heads over {k_pool.shape[0]} "
                         f"KV heads of {hd} dims")
    if rc != 0:
        raise ValueError(f"paged_decode_attention: lengths {lens.tolist()} or block ids outside "
                         f"{block_ids.shape[1]} blocks of 16 a sequence, {k_pool.shape[1]} in the pool")
    return out


# a plain Library op, not torch.library.custom_op: its Python wrapper cost ~5-10 us more a call
# (measured, batch 1), paid once per layer and step
_LIB = torch.library.Library("shardserve", "DEF")
_LIB.define("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_ids, "
            "Tensor lens, float scale) -> Tensor")
# its CPU kernel is registered when the kernel library is loaded (_library: C++, shards/runtime/ops.py)
torch.library.register_fake("shardserve::paged_decode_attention")(lambda q, *_: torch.empty_like(q))
