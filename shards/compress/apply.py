"""Applying a compression to a model's layers: what is left to apply to a source, and one
block's cuts, pruning and quantization."""
from __future__ import annotations

import dataclasses

import torch

from shards.compress.quantize import quantize_block, quantize_projection
from shards.compress.registry import UNQUANTIZED
from shards.compress.spec import Compression, CompressionError
from shards.compress.spec import parse as parse_compression
from shards.compress.structure import compress_structure
from shards.model.block import Block, fp32_block
from shards.model.source import ModelSource


def remaining(source: ModelSource, comp: Compression | None) -> tuple[Compression, Compression]:
    """(the compression this stage serves, the part still to apply at load). A prepared
    artifact (shards/compress/artifact.py) already holds its cuts and pruning; only quantization is left."""
    applied = getattr(source, "applied", None)
    comp = parse_compression(comp or getattr(source, "default_compression", "fp32"))
    if applied is None:
        return comp, comp
    if comp.structure not in (Compression(), applied.structure):
        raise CompressionError(f"{source.label} was prepared with {applied.spec}; serve it with its "
                               f"quantization only (e.g. {applied.quant}), not {comp.spec}")
    # GPTQ's grids are stored: served at their quantization, nothing is calibrated again
    gptq = source.gptq_quant == comp.quant
    return dataclasses.replace(applied.structure, quant=comp.quant, gptq=gptq), Compression(quant=comp.quant)


def compress_block(block: Block, comp: Compression, source: ModelSource | None = None,
                   maxima: dict | None = None) -> Block:
    """Cut and prune (fp32 weights; ranked by weights alone, since calibrated blocks come from
    shards/compress/calibration.py already cut), then quantize the block's projections, per `comp`.
    With `source`, the methods that keep 4-bit codes (w4a16, w4a8x2) keep a Q4 source's own codes
    where the weights are unchanged. maxima: w8a8's {projection: act_max} for this layer
    (shards/compress/maxima.py)."""
    compress_structure(block, comp)
    if comp.quant == UNQUANTIZED:    # fp32 weights stay as they are, GPTQ's grids included (prepare)
        return block
    return quantize_block(block, comp.quant, getattr(block, "grids", None) or _grids(source, block.layer, comp), maxima)


def _grids(source: ModelSource | None, layer: int, comp: Compression) -> dict | None:
    """The grids a layer's weights lie on: GPTQ's (shards/compress/calibration.py, or a prepared
    artifact), or for the methods that keep 4-bit codes, a Q4 source's own where unchanged."""
    if source is None:
        return None
    keep = comp.method.keeps_q4_codes and comp.structure == Compression()
    return (source.gptq_grids(layer) if source.gptq_quant == comp.quant else None) or \
        (int4_grids(source, layer) if keep else None)


def build_block(source: ModelSource, layer: int, comp: Compression, device="cpu", dtype=torch.float32,
                maxima: dict | None = None) -> Block:
    """fp32_block then compress_block. When nothing is cut or pruned, each projection is
    quantized as soon as it is built, so loading holds one projection group in fp32 (gate|up,
    the largest) besides the finished ones, not the whole layer."""
    if comp.structure != Compression() or comp.quant == UNQUANTIZED:
        return compress_block(fp32_block(source, layer, device, dtype), comp, source, maxima)
    grids = _grids(source, layer, comp)
    return fp32_block(source, layer, device, dtype,
                      finish=lambda name, lin: quantize_projection(name, lin, comp.quant, grids, maxima))


def int4_grids(source: ModelSource, layer: int) -> dict:
    """{projection: (d, m)} of the source's 4-bit groups, fused as the block fuses its
    projections; a projection whose parts are not all 4-bit groups is left out."""
    p = f"model.layers.{layer}."
    parts = {"qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "o_proj": ["self_attn.o_proj"], "gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
             "down_proj": ["mlp.down_proj"]}
    out = {}
    for proj, names in parts.items():
        grids = [source.int4_grid(p + n + ".weight") for n in names]
        if all(g is not None for g in grids):
            out[proj] = tuple(torch.cat([g[i] for g in grids]) for i in range(2))
    return out
