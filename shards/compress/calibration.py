"""Calibration for Wanda, SparseGPT, GPTQ and structured cuts (docs/compression.md).

Calibration text is the serving prompts (prompts-500.jsonl) unless a file is given (the user's
own domain: `--calibration`), and never the evaluation windows: when the file is the evaluation
text, the evaluated tokens are skipped (`held_out`). The text is packed into sequences of equal
length. A stage that starts at layer s gets its inputs by streaming layers [0, s) one at a time
(unchanged weights; peak memory one layer), then walks its own layers in order: collect input
statistics with the layer's original weights, cut and prune, and feed the next layer the
compressed layer's output (Wanda's sequential scheme), so errors of earlier layers are seen by
later ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shards.compress.apply import int4_grids
from shards.compress.cut import layer_similarity, layers_to_drop
from shards.compress.gptq import DAMP, GROUPS4, gptq_, grid_for
from shards.compress.quantize import LINEARS
from shards.compress.spec import Compression
from shards.compress.structure import Stats, compress_structure
from shards.data import PROMPTS, read_prompts, wikitext_ids
from shards.model.kv_cache import PagedKV
from shards.model.rope import Rope
from shards.model.step import StepBatch
from shards.model.step_context import StepContext
from shards.plan.layer_range import LayerRange
from shards.plan.memory import head_dim

N_SEQS, SEQLEN = 32, 128   # 4,096 calibration tokens
# GPTQ estimates a Hessian per projection (1536 x 1536 for down_proj) and gains from every
# prompt there is (77 x 128 = 9,856 tokens: nf4+gptq ppl 36.00 -> 35.23, seqlen 512 x 8);
# SparseGPT did not (71.4 -> 73.4 at its damping, 72.5 at 0.1), so it keeps 4,096
GPTQ_SEQS = 77
# a calibration file (--calibration): in sequences of 256, 65,536 tokens unless told, 16,384 for
# GPTQ (WikiText-2 held out from the eval windows; sparsegpt:0.5: 4,096 chat tokens 71.45, 16,384
# WikiText tokens 57.4, 65,536 51.6; nf4+gptq: 33.75 at 16,384, 33.91 at 32,768, for twice the time)
FILE_TOKENS, GPTQ_FILE_TOKENS, FILE_SEQLEN = 65536, 16384, 256
RESIDUAL_WRITERS = ("o_proj", "down_proj")     # in block order (GPTQ's mean correction)


@dataclass(frozen=True)
class CalibrationData:
    """Where calibration tokens come from. path None: the serving prompts (N_SEQS x SEQLEN
    tokens; GPTQ_SEQS x SEQLEN for GPTQ). A file: raw text (rows of whitespace become empty,
    as the perplexity reader does, so token offsets agree with it) or .jsonl (a "prompt" or
    "text" field per line), `tokens` of its tokens from token `skip` on, in rows of FILE_SEQLEN.
    (GPTQ's and SparseGPT's Hessians are [in, in]; the 1536-wide down_proj wants far more tokens
    than 1,536 to be well conditioned.)"""
    path: str | None = None
    tokens: int | None = None
    skip: int = 0

    def shape(self, gptq: bool) -> tuple[int, int]:
        """[sequences, seqlen] of the calibration batch."""
        if self.path is None:
            return (GPTQ_SEQS if gptq else N_SEQS), SEQLEN
        return math.ceil((self.tokens or (GPTQ_FILE_TOKENS if gptq else FILE_TOKENS)) / FILE_SEQLEN), FILE_SEQLEN

    def describe(self, gptq: bool) -> dict:
        """The manifest's record of it."""
        n, seqlen = self.shape(gptq)
        return {"data": Path(self.path).name if self.path else PROMPTS.name, "sequences": n, "seqlen": seqlen,
                "skip_tokens": self.skip}


def held_out(data: CalibrationData, text, eval_tokens: int | None) -> CalibrationData:
    """`data`, starting after the first `eval_tokens` tokens (None: all of them) when it is the
    evaluation text itself, so a perplexity is never measured on tokens the compression was fitted to."""
    if not (data.path and Path(data.path).resolve() == Path(text).resolve()):
        return data
    if eval_tokens is None:
        raise ValueError(f"calibration file {data.path} is the evaluation text and every window of it is "
                         "evaluated: nothing is left to calibrate on; evaluate fewer --windows")
    return dataclasses.replace(data, skip=max(data.skip, eval_tokens))


def file_ids(tokenizer, path: str) -> list[int]:
    if Path(path).suffix == ".jsonl":
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        text = "\n\n".join(r.get("prompt") or r.get("text") or "" for r in rows)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return wikitext_ids(tokenizer, path)


def calibration_ids(tokenizer, data: CalibrationData = CalibrationData(), gptq: bool = False) -> torch.Tensor:
    """[sequences, seqlen] token ids from `data`."""
    n_seqs, seqlen = data.shape(gptq)
    need, ids, start = n_seqs * seqlen, [], 0
    if data.path:
        every = file_ids(tokenizer, data.path)
        ids = every[data.skip:data.skip + need]
        if len(ids) < need:
            raise ValueError(f"calibration file {data.path} holds {len(every)} tokens, {len(every) - data.skip} "
                             f"after skipping {data.skip}; calibration needs {need}")
    while len(ids) < need:
        prompts = read_prompts(50, start)
        if not prompts:
            raise ValueError(f"the prompts file holds {len(ids)} tokens; calibration needs {need}")
        ids += tokenizer("\n\n".join(prompts) + "\n\n", add_special_tokens=False)["input_ids"]
        start += 50
    return torch.tensor(ids[:need]).view(n_seqs, seqlen)


class Calibrator:
    """Runs the packed calibration tokens through blocks as one prefill, one layer at a time."""

    def __init__(self, source, data: CalibrationData = CalibrationData(), gptq: bool = False):
        cfg = source.config
        self.ids = calibration_ids(source.tokenizer(), data, gptq)
        n_seqs, seqlen = self.ids.shape
        self.kv = PagedKV([], n_seqs * math.ceil(seqlen / 16), 16, cfg.num_key_value_heads, head_dim(cfg))
        batch = StepBatch(list(range(n_seqs)), [0] * n_seqs, [seqlen] * n_seqs)
        self.ctx = StepContext(batch, self.kv, Rope.of(cfg, self.kv.dtype, "cpu"))

    @torch.inference_mode()
    def run(self, block, x: torch.Tensor) -> torch.Tensor:
        """x: [n_seqs, seqlen, hidden] -> the block's output, same shape."""
        self.kv.add_layer(block.layer)
        try:
            return block(x, self.ctx.rope, self.kv, self.ctx)
        finally:
            self.kv.drop_layer(block.layer)

    def stats(self, block, x: torch.Tensor, gram_for: tuple[str, ...] = ()) -> tuple[Stats, torch.Tensor]:
        """Run the block with hooks on its projections; returns (stats, output)."""
        sq, sums, hooks, grams = {}, {}, [], {}

        def hook(name):
            def f(_mod, args):
                a = args[0].reshape(-1, args[0].shape[-1]).float()   # [tokens, in]
                sq[name] = sq.get(name, 0) + a.pow(2).sum(0)
                sums[name] = sums.get(name, 0) + a.sum(0)
                if name in gram_for:
                    grams[name] = grams.get(name, 0) + a.T @ a
            return f
        for name in LINEARS:
            hooks.append(getattr(block, name).register_forward_pre_hook(hook(name)))
        try:
            out = self.run(block, x)
        finally:
            for h in hooks:
                h.remove()
        tokens = x.shape[0] * x.shape[1]
        return Stats({k: v.sqrt() for k, v in sq.items()}, {k: v / tokens for k, v in sums.items()},
                     grams, tokens), out


def calibrated_blocks(source, layers: LayerRange, comp: Compression, load,
                      data: CalibrationData | None = None) -> tuple[dict, list[int]]:
    """{layer: fp32 Block cut and pruned by comp} for `layers`, and the layers dropped.
    load(layer) builds one fp32 Block on the CPU; data: default the serving prompts."""
    cal = Calibrator(source, data or CalibrationData(), bool(comp.gptq))
    with torch.inference_mode():
        x = torch.nn.functional.embedding(cal.ids, source.tensor("model.embed_tokens.weight").float())
    for layer in range(layers.start):
        x = cal.run(load(layer), x)
    dropped = []
    if comp.drop_layers:
        sims, y = {}, x
        for layer in layers:
            out = cal.run(load(layer), y)
            sims[layer], y = layer_similarity(y, out), out
        dropped = layers_to_drop(sims, comp.drop_layers)
    blocks = {}
    for layer in layers:
        if layer in dropped:
            continue
        block = load(layer)
        gram_for = LINEARS if comp.prune in ("sparsegpt", "sparsegpt-2:4") else \
            ("o_proj",) * bool(comp.cut_heads) + ("down_proj",) * bool(comp.cut_mlp)
        stats, _ = cal.stats(block, x, gram_for)
        compress_structure(block, comp, stats)
        if comp.gptq:
            quantize_gptq(block, comp, cal, x, source)
        x = cal.run(block, x)     # the next layer sees this one as it will serve
        blocks[layer] = block
    return blocks, dropped


def quantize_gptq(block, comp: Compression, cal: Calibrator, x: torch.Tensor, source) -> None:
    """GPTQ on each projection with the Hessian of the inputs it sees now (this block already
    cut and pruned, the layers before it already quantized); the weights end on the kernel's
    grid and the grids stay on the block (`block.grids`) for quantize_block. A 4-bit source's
    own grid is kept where the weights are the source's (w4a16 then changes nothing)."""
    stats, _ = cal.stats(block, x, LINEARS)
    own = int4_grids(source, block.layer) if comp.method.grid == GROUPS4 and comp.structure == Compression() else {}
    block.grids = {}
    before = {name: getattr(block, name).weight.data.clone() for name in RESIDUAL_WRITERS}
    for name in LINEARS:
        w = getattr(block, name).weight.data
        block.grids[name] = grid_for(w, comp.quant, own.get(name))
        gptq_(w, stats.grams[name], stats.tokens, block.grids[name], DAMP)
    correct_means(block, before, cal, x)


def correct_means(block, before: dict, cal: Calibrator, x: torch.Tensor) -> None:
    """Give the projections that write the residual stream (o_proj, down_proj) a bias that puts
    back the mean of their output error, (W - W_q) mean(inputs), over the inputs they see now.
    GPTQ leaves a mean shift: nf4+gptq ppl 35.23 -> 34.34 with this on chat prompts, 33.75 ->
    33.46 on held-out WikiText (all four projections: 33.36, but only these two have a bias slot
    in the checkpoint format). In block order, so down_proj's inputs already carry o_proj's
    correction. A weight GPTQ left unchanged gets no bias."""
    for name in RESIDUAL_WRITERS:
        lin = getattr(block, name)
        delta = before[name] - lin.weight.data          # [out, in]
        if not delta.any():
            continue
        stats, _ = cal.stats(block, x)
        d = delta @ stats.means[name]                   # [out]
        lin.bias = torch.nn.Parameter(d if lin.bias is None else lin.bias.data + d, requires_grad=False)
