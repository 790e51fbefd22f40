"""The compression registry: every quantization method shardserve serves, one record each.

Everything that differs between methods lives here and nowhere else: its spec name and the
older names it still answers to, the module that replaces a projection, how the embedding and
lm_head tables are stored, whether dynamo traces its modules, its nominal bits per weight,
whether GPTQ can fit weights onto its grid, whether it keeps a 4-bit source's own codes, what it
calibrates, and whether the controller may step a shard to it. Code elsewhere asks a `Method`
(`method("w8a16").compiles`), never compares method names.

Pure: no torch import. Module factories are named as "module:attribute" and imported on first
use, so parsing a spec or planning never loads torch or bitsandbytes.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from shards.errors import ShardServeError


class CompressionError(ShardServeError, ValueError):
    pass


@dataclass(frozen=True)
class Method:
    name: str                        # the spec name
    summary: str                     # one line: weights, activations, kernel
    layer: str                       # "module:callable" (lin, grid, act_max) -> module for one projection
    table: str                       # "module:callable" (read, n_rows, act_max, head) -> the embedding / lm_head table
    aliases: tuple[str, ...] = ()    # older spec names, accepted and mapped to `name`
    bits: float = 32.0               # nominal bits per weight, scales included (docs/compression.md)
    compiles: bool = True            # dynamo traces its modules (bitsandbytes' do not)
    int8_table: bool = False         # as a table: int8 codes read by row (`rows(ids)`)
    grid: str | None = None          # the grid GPTQ fits weights onto (shards/compress/gptq.py), if any
    variant: str = ""                # passed to the layer factory (bitsandbytes' quant type)
    keeps_q4_codes: bool = False     # served from a Q4 GGUF, keeps the file's own 4-bit codes
    bitsandbytes: bool = False       # its modules come from bitsandbytes (imported only then)
    act_maxima: bool = False         # calibrates activation maxima (SmoothQuant); takes nothing else
    ladder: bool = False             # the controller may raise or lower a shard to it
    # fp32 copies of its weights a step makes (the workspace, shards/plan/footprint.py): "" none,
    # "block" DEQUANT_BYTES of a projection at a time (prefill), "whole" a projection at once
    dequantizes: str = ""
    load_layers: float = 1.0         # fp32 layers loading holds beside the finished ones (a bound, measured)
    # its projections and table run shards/compress/qmatmul.cpp, whose team splits a decode step
    # that no other group overlaps over every core (shards/runtime/cores.py::kernel_team)
    kernel_team: bool = False
    # its decode steps run as one C++ call on the CPU (shards/model/fused.py): no graph compiled
    fused_decode: bool = False
    act_levels: int = 0              # int8 levels per group of 32 activations that kernel multiplies

    @property
    def gptq(self) -> bool:
        return self.grid is not None

    def make_table(self) -> Callable:
        """(read(start, end) -> fp32 rows, n_rows, act_max | None, head: serves as lm_head) -> the table."""
        return _resolve(self.table)

    def make_layer(self) -> Callable:
        """(lin: nn.Linear, method, grid | None, act_max | None) -> the module serving lin."""
        return _resolve(self.layer)


def _resolve(ref: str) -> Callable:
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


_Q = "shards.compress.quantize"
# bitsandbytes quantizes a whole projection at once through fp32 temporaries
LOAD_LAYERS_BNB = 2.0
METHODS: tuple[Method, ...] = (
    Method("fp32", "weights as the file stores them, dequantized to fp32", f"{_Q}:keep", f"{_Q}:fp32_table",
           ladder=True),
    Method("bf16", "bf16 weights, inputs cast to bf16 and back", f"{_Q}:bf16_linear", f"{_Q}:bf16_table", bits=16),
    Method("w8a16", "int8 weights per output channel; bf16 activations at decode, fp32 GEMM at prefill",
           f"{_Q}:int8_linear", f"{_Q}:int8_table", aliases=("int8-cpu",), bits=8.25, int8_table=True, grid="int8-rows",
           ladder=True, dequantizes="block"),
    Method("w4a16", "4-bit weights per group of 32 (scale, zero), bf16 activations (torch's int4 kernel)",
           "shards.compress.int4:from_linear", f"{_Q}:int8_table", aliases=("int4-cpu",), bits=5.0, int8_table=True, grid="int4-groups",
           keeps_q4_codes=True, ladder=True, load_layers=1.5),
    Method("w8a8", "SmoothQuant int8 weights and per-token int8 activations; down_proj weight-only "
           "with two int8 levels of its input", f"{_Q}:w8a8_linear", f"{_Q}:w8a8_table", aliases=("w8a8-cpu",),
           bits=8.25, int8_table=True, act_maxima=True),
    Method("w4a8x2", "4-bit weights per group of 32; activations as two int8 levels per row (~15 bits), "
           "our VNNI/AVX2 kernel", "shards.compress.qmatmul:from_linear", "shards.compress.qmatmul:q8_table", aliases=("w4a8-cpu",),
           bits=5.0, int8_table=True, keeps_q4_codes=True, kernel_team=True, fused_decode=True, act_levels=2),
    Method("w4a8x1", "4-bit weights per group of 32; activations as one int8 level per group (llama.cpp's "
           "Q8_0): half w4a8x2's integer work where a step is bound by it", "shards.compress.qmatmul:from_linear",
           "shards.compress.qmatmul:q8_table_x1", bits=5.0, int8_table=True, keeps_q4_codes=True, kernel_team=True,
           fused_decode=True, act_levels=1),
    Method("llm-int8", "bitsandbytes LLM.int8 (int8 weights, fp16 outlier columns above 6.0)",
           f"{_Q}:bnb_linear", f"{_Q}:int8_table", aliases=("int8",), bits=8.25, int8_table=True, compiles=False, bitsandbytes=True,
           variant="8bit", dequantizes="whole", load_layers=LOAD_LAYERS_BNB),
    Method("nf4", "bitsandbytes NormalFloat4, blocks of 32, double-quantized absmax, fp32 compute",
           f"{_Q}:bnb_linear", f"{_Q}:int8_table", bits=4.6, int8_table=True, compiles=False, grid="nf4-blocks", bitsandbytes=True, variant="nf4",
           ladder=True, dequantizes="whole", load_layers=LOAD_LAYERS_BNB),
    Method("fp4", "bitsandbytes FP4, blocks of 32, double-quantized absmax, fp32 compute",
           f"{_Q}:bnb_linear", f"{_Q}:int8_table", bits=4.6, int8_table=True, compiles=False, bitsandbytes=True,
           variant="fp4", dequantizes="whole", load_layers=LOAD_LAYERS_BNB),
)
UNQUANTIZED = METHODS[0].name     # fp32: the weights as loaded; a spec of cuts alone omits it
_BY_NAME = {m.name: m for m in METHODS} | {a: m for m in METHODS for a in m.aliases}
PRESETS = {"fast": "w4a8x2", "balanced": "w4a16", "smallest": "nf4+cut-mlp:0.2"}


def method(name: str) -> Method:
    """The method a spec name or alias stands for; refuses unknown names with the valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CompressionError(f"unknown quantization {name!r}; valid: {', '.join(names())}") from None


def canonical(name: str) -> str:
    return method(name).name


def is_method(name: str) -> bool:
    return name in _BY_NAME


def names() -> list[str]:
    """Spec names, then aliases as 'alias (= name)'."""
    return [m.name for m in METHODS] + [f"{a} (= {m.name})" for m in METHODS for a in m.aliases]


def ladder(present: str | None = None) -> tuple[str, ...]:
    """The methods the controller steps between, in registry order (the controller orders them
    by the bytes it measures on the model it serves). A spec off the ladder that is served
    (`present`) joins it, so a shard can be raised from where it starts and lowered back."""
    out = [m.name for m in METHODS if m.ladder]
    if present is not None and canonical(present) not in out:
        out.append(canonical(present))
    return tuple(out)
