"""The structural part of a compression: cuts, then pruning, in place on a block's fp32 weights."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shards.compress.cut import cut_heads, cut_mlp
from shards.compress.prune import prune_block
from shards.compress.quantize import LINEARS
from shards.compress.sparsegpt import sparsegpt_
from shards.compress.spec import Compression


@dataclass
class Stats:
    """Per projection: input-column L2 norms and means over the calibration tokens, [in] each;
    X^T X [in, in] of the inputs of the projections asked for (o_proj: the cut-heads refit;
    all of them: SparseGPT's Hessians), over `tokens` tokens."""
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    @property
    def gram(self) -> torch.Tensor | None:
        return self.grams.get("o_proj")


def compress_structure(block, comp: Compression, stats: Stats | None = None) -> None:
    """Cuts, then pruning, in place on fp32 weights. stats=None ranks by weights alone (right
    shapes and bytes, for the memory model; not for serving Wanda or cuts)."""
    norms = dict(stats.norms) if stats else {}
    grams = dict(stats.grams) if stats else {}
    extra = {"down_proj": (stats.means.get("down_proj"), stats.grams.get("down_proj")),
             "o_proj": (stats.gram,)} if stats else {}
    for frac, cut, name in ((comp.cut_mlp, cut_mlp, "down_proj"), (comp.cut_heads, cut_heads, "o_proj")):
        if frac:
            keep = cut(block, frac, norms.get(name), *extra.get(name, ()))
            if name in norms:
                norms[name] = norms[name][keep]
            if name in grams:       # the cut removed these inputs of the projection
                grams[name] = grams[name][keep][:, keep]
    if comp.prune in ("sparsegpt", "sparsegpt-2:4") and stats is not None:
        n, m = (2, 4) if comp.prune == "sparsegpt-2:4" else (0, 0)
        for name in LINEARS:
            sparsegpt_(getattr(block, name).weight.data, grams[name], stats.tokens, comp.sparsity, n, m)
    elif comp.prune:
        # without calibration (the memory model's shapes) SparseGPT's masks are magnitude's
        method = {"sparsegpt": "magnitude", "sparsegpt-2:4": "2:4"}.get(comp.prune, comp.prune)
        prune_block(block, method, comp.sparsity, norms or None)
