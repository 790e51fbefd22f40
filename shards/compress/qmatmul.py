"""w4a8x2's matmuls: weights in groups of 32 inputs (4-bit codes as GGUF's Q4_1, or 8-bit as
Q8_0, each group with an fp16 scale and minimum), activations rounded to two int8 levels per
group, multiplied by our kernel (shards/compress/qmatmul.cpp: AVX-512 VNNI, 16 output rows per
instruction, AMX tiles from 16 activation rows where the CPU has them; AVX2 on CPUs without
AVX-512; portable loops elsewhere; the same bits on every path), called as the torch op
`shardserve::qmatmul` so the compiled decode graph holds it.

Why: at small batches a decode step streams every weight from memory, and 4.5 bits a weight
stream faster than int8's 8 (one 3072 x 576 layer cycled with 39 others, beyond the L3, us at
batch 1 / 4 / 8 / 16, 2 threads: the kernel alone at one level 24 / 34 / 59 / 99 against
`_int_mm` alone 57 / 138 / 146 / 177; this module, eager, at one level 34 / 41 / 68 / 105, at
two 40 / 51 / 115 / 172, against W8A8CpuLinear's 88 / 180 / 205 / 230). Two levels, x ~ a1 xq1
+ a2 xq2 per group (~15 bits), because one loses quality where inputs have outlier channels
(WikiText-2, seqlen 512 x 8, fp32 30.60, w4a16's modules elsewhere: qkv_proj through one
level 30.79, gate_up_proj 30.69, o_proj 30.65; every projection at one level 30.98, at two
30.64). The embedding and
lm_head table is 8-bit (Q8Linear): the default GGUF stores it as Q8_0, whose codes and scales
it keeps exactly, and 4 bits would be the table's first loss.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import subprocess
from pathlib import Path

import torch
from torch import nn

from shards.compress.int4 import GROUP, QUANT_ROWS, codes_on, rtn_grid

SOURCE = Path(__file__).with_name("qmatmul.cpp")
# the machine's table of shard processes and whether each steps now (qmatmul.cpp, "Lending"):
# 64 slots of (pid, stepping) int32, in shared memory
NODE_TABLE = Path("/dev/shm") / f"shardserve-steps-{os.getuid()}"
NODE_TABLE_BYTES = 64 * 8
PANEL = 16      # output rows one kernel vector serves
LEVELS = 2      # int8 levels of the activations


@functools.cache
def _kernel() -> ctypes.CDLL:
    from shards.runtime import kernels
    try:
        lib = kernels.load(SOURCE)
    except (OSError, subprocess.SubprocessError) as e:
        raise OSError(f"w4a8x2 needs its kernel, built with the node's C++ compiler: {e}") from e
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qmatmul.argtypes = [p, p, p, p, i64, i64, i64, i32, i32, i32, i32]
    lib.qmatmul_use_amx.argtypes = [i32]
    lib.qmatmul_team.argtypes = [i32]
    lib.qmatmul_lend.argtypes = [i32]
    lib.qmatmul_stepping.argtypes = [i32]
    lib.qmatmul_node_join.argtypes = [p]
    lib.qmatmul_lent.restype = i64
    lib.qmatmul_rows.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.qmatmul_team_threads.restype = i32
    from shards.runtime import ops
    ops.register(_LIB, "qmatmul", lib.qmatmul, qmatmul)
    return lib


PATHS = ("portable", "avx2", "avx512-vnni")


def path() -> str:
    """The kernel's path on this CPU: avx512-vnni, avx2 (no AVX-512) or portable loops."""
    return PATHS[_kernel().qmatmul_path()]


@functools.cache
def _node_table() -> mmap.mmap | None:
    """This process's slot in the machine's table of stepping shards (joined once; kept mapped
    for the process's life); None where it cannot be mapped or is full: no lending then."""
    try:
        fd = os.open(NODE_TABLE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < NODE_TABLE_BYTES:
                os.ftruncate(fd, NODE_TABLE_BYTES)      # new pages read as zeros: every slot free
            table = mmap.mmap(fd, NODE_TABLE_BYTES)
        finally:
            os.close(fd)
    except OSError:
        return None
    slot = _kernel().qmatmul_node_join(ctypes.addressof(ctypes.c_char.from_buffer(table)))
    return table if slot >= 0 else None


def _loaded(table: bool = False) -> ctypes.CDLL | None:
    """The kernel library where a stage of this process loaded it (with `table`: and this
    process holds a slot in the machine's table), else None."""
    if not _kernel.cache_info().currsize or (table and _node_table() is None):
        return None
    return _kernel()


@contextlib.contextmanager
def _switched(lib: ctypes.CDLL | None, call: str, on: int, off: int):
    """lib.call(on) for the block, lib.call(off) after it; nothing where lib is None."""
    if lib is not None:
        getattr(lib, call)(on)
    try:
        yield
    finally:
        if lib is not None:
            getattr(lib, call)(off)


def stepping(on: bool = True):
    """Marks this process's step in the machine's table while the block runs, so lending
    helpers of other shards stay out (see `lend`); a no-op when `on` is false or no stage of
    this process loaded the kernel."""
    return _switched(_loaded(table=True) if on else None, "qmatmul_stepping", 1, 0)


def lend(n: int):
    """Inside, a kernel call is split over n threads when, as it starts, no other shard process
    of the machine is stepping (their steps are marked by `stepping`); otherwise it runs on this
    thread alone. For a step that other groups overlap, so the cores one shard leaves idle while
    it waits for its next group serve the other (qmatmul.cpp, "Lending"). A no-op where n <= 1,
    no stage of this process loaded the kernel, or the machine's table cannot be mapped."""
    return _switched(_loaded(table=True) if n > 1 else None, "qmatmul_lend", n, 1)


def lent() -> int:
    """Chunks of kernel calls this process's helpers ran while lending, so far."""
    return int(_kernel().qmatmul_lent())


def team(n: int):
    """Inside, steps split the kernel's panels over n threads (AMX tiles or not): this one and
    n - 1 helpers that wait between calls, yielding their cores to any other runnable thread,
    until the block ends (qmatmul.cpp, "The team"). For a
    step no other group overlaps; one calling thread at a time. A no-op where n <= 1 or no stage
    of this process loaded the kernel."""
    return _switched(_loaded() if n > 1 else None, "qmatmul_team", n, 1)


def team_hooks() -> tuple[int, int] | None:
    """The addresses of the C functions qmatmul_team_run and qmatmul_team_threads, through which
    other kernels split their work over this process's team (decode attention,
    shards/model/attention.py::use_team); None where no stage of this process loaded the kernel."""
    lib = _loaded()
    if lib is None:
        return None
    return tuple(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in ("qmatmul_team_run", "qmatmul_team_threads"))


def amx(on: bool | None = None) -> bool:
    """Whether steps of 16 activation rows and more (rows x levels) take AMX tiles (a CPU with
    AMX-INT8 whose kernel grants the tile state; SHARDSERVE_AMX=0 turns it off); `on` switches
    it for this process. The same bits either way."""
    return bool(_kernel().qmatmul_use_amx(-1 if on is None else int(on)))


def pack(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes u [N, K] (0..15 or 0..255) and the grid d, m [N, K / 32] -> the kernel's
    (packed uint8 [N / 16, K * bits / 512, 64], scales fp16 [N / 16, K / 32, 2, 16]); m None:
    symmetric groups, m = -2^(bits - 1) d, scales [N / 16, K / 32, 16] (d alone). Layouts in
    qmatmul.cpp."""
    n, k = u.shape
    u = u.to(torch.uint8)
    if bits == 4:
        u = u.reshape(n // PANEL, PANEL, k // 8, 2, 4)                   # input 8 c + 4 h + j
        u = u[..., 0, :] | (u[..., 1, :] << 4)
    packed = u.reshape(n // PANEL, PANEL, -1, 4).permute(0, 2, 1, 3).contiguous()
    if m is None:
        scales = d.reshape(n // PANEL, PANEL, -1).permute(0, 2, 1)
    else:
        scales = torch.stack([d.reshape(n // PANEL, PANEL, -1), m.reshape(n // PANEL, PANEL, -1)], 2).permute(0, 3, 2, 1)
    return packed.reshape(n // PANEL, -1, 64), scales.contiguous().to(torch.float16)


def qmatmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int, bits: int,
            levels: int) -> torch.Tensor:
    """x [rows, K] fp32 -> [rows, n] fp32 through the kernel."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    rc = _kernel().qmatmul(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), y.data_ptr(),
                           x.shape[0], n, x.shape[1], bits, levels, int(scales.dim() == 4), torch.get_num_threads())
    if rc:
        raise ValueError(f"qmatmul: {n} x {x.shape[1]} is not a multiple of {PANEL} x {GROUP}, or "
                         f"{bits} bits / {levels} levels is not 4 or 8 / 1 or 2")
    return y


class GroupQuantLinear(nn.Module):
    """y = x @ W^T (+ bias), W as packed codes per group of 32 with fp16 (d, m); `bits` 4 or 8."""

    bits = 4

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, k: int,
                 bias: torch.Tensor | None = None, levels: int = LEVELS):
        super().__init__()
        if packed.device.type == "cpu":
            _kernel()      # built (or found) at load: a node without a compiler fails here, not mid-request
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.in_features, self.out_features, self.levels = k, packed.shape[0] * PANEL, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if x.device.type == "cpu":
            y = torch.ops.shardserve.qmatmul(x2, self.packed, self.scales, self.out_features, self.bits,
                                             self.levels)
        else:                          # the kernel is CPU-only: the same weights, dequantized
            y = x2 @ self.dequantized().t()
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unsigned codes [N, K] (or of `rows` only), int32."""
        p, kc, _ = self.packed.shape
        b = self.packed.view(p, kc, PANEL, 4)
        b = b.permute(0, 2, 1, 3).reshape(p * PANEL, kc, 4) if rows is None else b[rows // PANEL, :, rows % PANEL]
        b = b.int()
        if self.bits == 4:
            b = torch.stack([b & 15, b >> 4], 2)                 # [rows, chunks, 2, 4]: input 8 c + 4 h + j
        return b.reshape(b.shape[0], self.in_features)

    @property
    def symmetric(self) -> bool:
        """Scales hold d alone and m = -2^(bits - 1) d (GGUF's Q4_0, Q8_0)."""
        return self.scales.dim() == 3

    def dequantized(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [N, K] (or its `rows`) fp32 the kernel computes with: w = d u + m."""
        p, ng = self.scales.shape[:2]
        # rows picked before the fp32 cast: an embedding lookup must not convert the whole table
        sc = self.scales.view(p, ng, -1, PANEL)
        sc = (sc.permute(0, 3, 1, 2).reshape(p * PANEL, ng, -1) if rows is None
              else sc[rows // PANEL, :, :, rows % PANEL]).float()
        d = sc[..., :1]
        m = d * -(1 << (self.bits - 1)) if self.symmetric else sc[..., 1:]
        u = self.codes(rows).float().reshape(-1, ng, GROUP)
        return (u * d + m).reshape(-1, self.in_features)


class W4A8CpuLinear(GroupQuantLinear):
    """w4a8x2's projections: w4a16's 4-bit groups (a Q4 GGUF's own codes, d and m in fp16 as
    the file stores them, so the weights are exactly the file's). A row's result does not depend
    on its batch and prefill runs the same kernel, so perplexity measures what decode serves."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 grid: tuple[torch.Tensor, torch.Tensor] | None = None, levels: int = LEVELS):
        n, k = weight.shape
        if k % GROUP or n % PANEL:
            raise ValueError(f"w4a8x2 needs input widths divisible by {GROUP} and output widths by "
                             f"{PANEL} (the kernel's panels), got {n} x {k}")
        d, m = grid if grid is not None else rtn_grid(weight)
        d, m = d.half().float(), m.half().float()     # stored in fp16: the codes follow them
        sym = torch.equal(m, -8 * d)                  # a Q4_0 source: d alone is stored
        # coded and packed QUANT_ROWS rows at a time (a multiple of PANEL: panels stay whole), so
        # the fp32 and int32 temporaries are of a block, not of the projection
        parts = [pack(codes_on(weight[a:a + QUANT_ROWS], d[a:a + QUANT_ROWS], m[a:a + QUANT_ROWS]),
                      d[a:a + QUANT_ROWS], None if sym else m[a:a + QUANT_ROWS], 4) for a in range(0, n, QUANT_ROWS)]
        super().__init__(torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts]), k, bias, levels)


class Q8Linear(GroupQuantLinear):
    """8-bit codes per group of 32 with an fp16 scale (GGUF's Q8_0: w = d q, q in -127..127,
    stored as u = q + 128; symmetric, so the scales hold d alone and the kernel makes m = -128 d).
    Rounded to nearest on each group's absmax, which gives a Q8_0 source's codes back exactly.
    Serves as lm_head and, by `rows`, the embedding."""

    bits = 8

    @classmethod
    def from_rows(cls, read, n_rows: int, chunk: int = 4096, levels: int = LEVELS) -> "Q8Linear":
        """Quantize `chunk` rows at a time; read(start, end) -> fp32 rows [rows, K]."""
        parts = [cls._quantize(read(a, min(a + chunk, n_rows))) for a in range(0, n_rows, chunk)]
        return cls(torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts]), parts[0][1].shape[1] * GROUP,
                   levels=levels)

    @staticmethod
    def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if w.shape[0] % PANEL or w.shape[1] % GROUP:
            raise ValueError(f"an 8-bit table needs {PANEL} x {GROUP} multiples, got {w.shape[0]} x {w.shape[1]}")
        g = w.float().reshape(w.shape[0], -1, GROUP)
        d = (g.abs().amax(-1) / 127).half().float()
        q = torch.round(g / torch.where(d > 0, d, 1).unsqueeze(-1)).clamp_(-127, 127)
        return pack((q + 128).reshape(w.shape), d, None, 8)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of token ids [...] -> [..., K] fp32: dequantized(ids) in one kernel
        call, where its ~15 torch ops took 65-100 us of a 19-layer stage's decode step."""
        flat = ids.reshape(-1).to(torch.long).contiguous()
        out = torch.empty(flat.numel(), self.in_features)
        rc = _kernel().qmatmul_rows(self.packed.data_ptr(), self.scales.data_ptr(), flat.data_ptr(), out.data_ptr(),
                                    flat.numel(), self.out_features, self.in_features, int(not self.symmetric))
        if rc:
            raise IndexError(f"token ids must be in [0, {self.out_features}), got {flat.min()} .. {flat.max()}")
        return out.reshape(*ids.shape, self.in_features)


_LIB = torch.library.Library("shardserve", "FRAGMENT")
_LIB.define("qmatmul(Tensor x, Tensor packed, Tensor scales, int n, int bits, int levels) -> Tensor")
# its CPU kernel is registered when the kernel library is loaded (_kernel: C++, shards/runtime/ops.py)
torch.library.register_fake("shardserve::qmatmul")(lambda x, packed, scales, n, bits, levels: x.new_empty(x.shape[0], n))


def from_linear(lin: nn.Linear, method, grid: tuple[torch.Tensor, torch.Tensor] | None = None, _act_max=None) -> nn.Module:
    """w4a8x2's and w4a8x1's module for one projection (the registry's factory, activations at
    the method's `act_levels`); grid: a Q4 source's (d, m)."""
    return W4A8CpuLinear(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), grid,
                         method.act_levels)


def q8_table(read, n_rows: int, _act_max=None, _head: bool = True) -> "Q8Linear":
    """w4a8x2's embedding / lm_head table: 8-bit groups (a Q8_0 source's own codes)."""
    return Q8Linear.from_rows(read, n_rows)


def q8_table_x1(read, n_rows: int, _act_max=None, _head: bool = True) -> "Q8Linear":
    """w4a8x1's table: w4a8x2's, its lm_head multiplying one int8 level of the final hidden state."""
    return Q8Linear.from_rows(read, n_rows, levels=1)
