"""A decode step as one C++ call (shards/model/fused.cpp): every layer of the stage, kernel after
kernel, with no Python, torch dispatcher or graph wrapper between them.

Why: the compiled decode graph (shards/model/compiled.py) runs our kernels from inductor's Python
wrapper, one dispatcher call per projection and attention and a fused kernel call per norm, RoPE
and SwiGLU, ~12 calls a layer. Layers [0, 19) of the default model, w4a8x2, batch 1, one thread:
the kernels themselves were 73% of a 2.48 ms step (torch.profiler), the wrapper, the graph's
small fused kernels, its bytecode and its allocations the rest. The fused call pays one ctypes
call a step; the layer table (every layer's weight pointers and sizes) is built once per layer
set and rebuilt when a re-shard or a recompress changes the stage.

It serves stages whose every projection runs our group kernel (w4a8x2, w4a8x1: the default) on
the CPU with fp32 activations and KV, and whose attention takes attention.cpp's kernel; other
stages decode through the compiled graph. `fits()` says which. The result equals the graph's up
to the norms' summation order (tests/test_fused.py). SHARDSERVE_FUSED_DECODE=0 decodes through
the graph instead (A/B runs).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

from shards.compress import qmatmul
from shards.compress.qmatmul import GroupQuantLinear
from shards.errors import ShardServeError
from shards.model import attention

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.cpp")
ON = os.environ.get("SHARDSERVE_FUSED_DECODE", "1") != "0"
MAX_HEAD_DIM = 256   # fused.cpp's RoPE buffer
_CALLS = ("qkv_proj", "attention", "o_proj", "gate_up_proj", "down_proj")

_p, _i64, _i32, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Proj(ctypes.Structure):
    _fields_ = [("packed", _p), ("scales", _p), ("bias", _p), ("n", _i64), ("k", _i64),
                ("bits", _i32), ("levels", _i32), ("minimum", _i32), ("pad", _i32)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj),
                ("attn_norm", _p), ("mlp_norm", _p), ("k_pool", _p), ("v_pool", _p),
                ("n_heads", _i64), ("n_kv", _i64), ("head_dim", _i64), ("pool_blocks", _i64),
                ("eps", _f), ("scale", _f)]


class FusedError(ShardServeError):
    """A fused decode step's kernel refused its inputs."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built library, bound to our two kernels; None where it cannot be built (logged once:
    such stages decode through the graph)."""
    from shards.runtime import kernels, ops
    flags, libs = ops.torch_flags()
    try:
        # no fused multiply-adds: inductor builds its kernels with this flag too (the same bits)
        lib = kernels.load(SOURCE, (*flags, "-ffp-contract=off"), libs)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fused decode unavailable, decode steps run the compiled graph: %s", e)
        return None
    lib.fused_bind.argtypes = [_p, _p]
    lib.fused_decode.argtypes = [_p, _i64, _p, _i64, _i64, _p, _p, _i64, _p, _p, _p, ctypes.c_int]
    q, a = qmatmul._kernel(), attention._library()
    lib.fused_bind(ctypes.cast(q.qmatmul, _p), ctypes.cast(a.paged_decode_attention, _p))
    return lib


def _fits_linear(lin) -> bool:
    return (type(lin).forward is GroupQuantLinear.forward and lin.packed.device.type == "cpu"
            and (lin.bias is None or lin.bias.dtype == torch.float32))


def fits(blocks, pools, dtype: torch.dtype) -> bool:
    """Whether a fused call can decode these layers: fp32 activations, every projection our group
    kernel's on the CPU, attention through attention.cpp over each layer's (k_pool, v_pool)."""
    if not ON or dtype != torch.float32 or not blocks or not attention.available():
        return False
    return all(all(_fits_linear(getattr(b, n)) for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
               and b.attn_norm.weight.dtype == torch.float32 and b.mlp_norm.weight.dtype == torch.float32
               and b.head_dim <= MAX_HEAD_DIM and attention.supports(kp, b.n_heads, b.n_kv)
               and vp.is_contiguous() and vp.shape == kp.shape
               for b, (kp, vp) in zip(blocks, pools)) and _library() is not None


def _proj(lin: GroupQuantLinear) -> _Proj:
    return _Proj(lin.packed.data_ptr(), lin.scales.data_ptr(), 0 if lin.bias is None else lin.bias.data_ptr(),
                 lin.out_features, lin.in_features, lin.bits, lin.levels, int(not lin.symmetric), 0)


def _layer(b, k_pool: torch.Tensor, v_pool: torch.Tensor) -> _Layer:
    return _Layer(_proj(b.qkv_proj), _proj(b.o_proj), _proj(b.gate_up_proj), _proj(b.down_proj),
                  b.attn_norm.weight.data_ptr(), b.mlp_norm.weight.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                  b.n_heads, b.n_kv, b.head_dim, k_pool.shape[1], b.attn_norm.eps, b.head_dim ** -0.5)


class FusedDecode:
    """The fused decode of a run of layers (blocks and their pools, in layer order); holds the
    tensors its table points into, so they live as long as it does."""

    def __init__(self, blocks, pools, first_layer: int = 0):
        self.blocks, self.pools, self.first_layer = tuple(blocks), tuple(pools), first_layer
        self.table = (_Layer * len(self.blocks))(*(_layer(b, kp, vp) for b, (kp, vp) in zip(self.blocks, self.pools)))
        self.lib = _library()

    def __call__(self, x: torch.Tensor, slots: torch.Tensor, block_ids: torch.Tensor, lens: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, hidden] fp32, contiguous, updated in place and returned; slots [B], block_ids
        [B, nb], lens [B] int64; cos, sin [B, head_dim] fp32 (contiguous)."""
        b, hidden = x.shape
        rc = self.lib.fused_decode(self.table, len(self.table), x.data_ptr(), b, hidden, slots.data_ptr(),
                                   block_ids.data_ptr(), block_ids.shape[1], lens.data_ptr(), cos.data_ptr(),
                                   sin.data_ptr(), torch.get_num_threads())
        if rc:
            raise FusedError(self._error(rc, slots, block_ids, lens))
        return x

    def _error(self, rc: int, slots, block_ids, lens) -> str:
        if rc == -1:
            return f"slots {slots.tolist()} outside the KV pool's {self.pools[0][0].shape[1] * 16} slots"
        i, call = divmod(rc, 8)
        b = self.blocks[i]
        if _CALLS[call - 1] == "attention":
            return (f"layer {self.first_layer + i}: attention refused lengths {lens.tolist()} over "
                    f"{block_ids.shape[1]} blocks a sequence ({b.n_heads} heads, {b.n_kv} KV heads of {b.head_dim})")
        lin = getattr(b, _CALLS[call - 1])
        return (f"layer {self.first_layer + i}: {_CALLS[call - 1]} ({lin.out_features} x {lin.in_features}, "
                f"{lin.bits} bits, {lin.levels} levels) refused by the kernel")
