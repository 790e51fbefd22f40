"""A stage: decoder layers [start, end) of a Llama-family model (shards/model/block.py), built from
only their tensors, plus the embedding (first stage) or final norm and lm_head (last), their
paged KV cache and the compiled decode step. Chained, the stages match transformers'
LlamaForCausalLM (tests/test_split_equals_whole.py states the tolerance).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from shards.compress import registry
from shards.compress.apply import build_block, compress_block, remaining
from shards.compress.calibration import calibrated_blocks
from shards.compress.maxima import activation_maxima
from shards.compress.quantize import Int8Embedding
from shards.compress.smoothing import HEAD
from shards.compress.spec import Compression, CompressionError
from shards.compress.spec import parse as parse_compression
from shards.errors import RangeError
from shards.model import attention
from shards.model.block import Block, RMSNorm, fp32_block
from shards.model.kv_cache import PagedKV
from shards.model.rope import Rope
from shards.model.source import ModelSource
from shards.model.step import StepBatch, from_wire
from shards.model.step_context import StepContext, dummy_decode
from shards.plan.layer_range import LayerRange
from shards.plan.memory import head_dim, module_bytes

log = logging.getLogger(__name__)


class Stage(nn.Module):
    """Layers `layers` of the model plus embedding (first stage) / final norm + lm_head (last)."""

    def __init__(self, source: ModelSource, layers: LayerRange, kv_blocks: int = 256,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 compression: str | None = None, quantize: bool = True, compile: bool = False,
                 threads: tuple[int, ...] = (), calibration=None):
        """quantize=False (prepare): everything but the final quantization; GPTQ's weights stay
        fp32 on their grids (`block.grids`). calibration: a CalibrationData for the methods that
        calibrate (default: the serving prompts); layers added later calibrate on it too.
        compile: decode steps run the compiled layer graph (shards/model/compiled.py), compiled here,
        before the stage is ready, for each CPU thread count in `threads` (default: the current
        one; a graph is only valid for its count)."""
        super().__init__()
        self.quantize, self.calibration = quantize, calibration
        self._act_max = None    # w8a8's activation maxima, read on first use
        cfg = self.config = source.config
        self.compression, todo = remaining(source, compression)
        self.device = torch.device(device)
        self.layers = layers.check_within(cfg.num_hidden_layers)
        self.is_first, self.is_last = layers.is_first(), layers.is_last(cfg.num_hidden_layers)
        self.dtype = dtype
        self.blocks = nn.ModuleDict()
        self._layers_run = None   # _ordered()'s, until the layers change
        self._add_ends(source, self.compression.quant if quantize else "fp32")
        self.kv = PagedKV([], kv_blocks, block_size, cfg.num_key_value_heads, head_dim(cfg), dtype, self.device)
        self.todo = todo
        self.dropped = {i for i in getattr(source, "dropped_layers", ()) if i in layers}
        self._add_layers(source, layers, todo)
        self.rope = Rope.of(cfg, dtype, self.device)
        # compile: decode steps run fused (shards/model/fused.py) where the layers fit it, else
        # through the compiled graph, built only when first needed (at load, or when a
        # recompress leaves the fused path)
        self.compile, self.threads = compile, threads or (torch.get_num_threads(),)
        self.compiled = None
        self._fused = None        # FusedDecode of _ordered()'s run, until the layers change
        self.fused_steps = 0      # decode steps run fused, over every layer set
        if compile:
            self._warm(whole=True)

    def _add_ends(self, source: ModelSource, quant: str) -> None:
        """Embedding (first stage), final norm + lm_head (last), stored as the method's tables
        (shards/compress/quantize.py); a tied pair on one stage shares one table. Set only once
        all are built."""
        m, cfg = registry.method(quant), self.config
        tied = self.is_first and self.is_last and cfg.tie_word_embeddings
        names = (["model.embed_tokens.weight"] if self.is_first else []) + \
                (["model.embed_tokens.weight" if tied else "lm_head.weight"] if self.is_last else [])
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        # int8 tables quantize fp32 rows a chunk at a time (never the whole fp32 table); dense
        # tables take the stage's dtype
        dtype = None if m.int8_table else self.dtype
        read = lambda n: lambda a, b: source.rows(n, a, b).to(device=self.device, dtype=dtype)  # noqa: E731
        lm_head = lambda n: self.is_last and n == head  # noqa: E731
        tables = {n: m.make_table()(read(n), cfg.vocab_size,
                                    self._maxima(source)[HEAD] if m.act_maxima and lm_head(n) else None, lm_head(n))
                  for n in dict.fromkeys(names)}
        out = {}
        if self.is_first:
            t = tables["model.embed_tokens.weight"]
            out["embed"] = Int8Embedding(t) if m.int8_table else nn.Embedding.from_pretrained(t.weight)
        if self.is_last:
            out["norm"] = RMSNorm(self._load(source, "model.norm.weight"), cfg.rms_norm_eps)
            out["lm_head"] = tables[head]
        for name, module in out.items():
            setattr(self, name, module)

    def _maxima(self, source: ModelSource) -> dict:
        """w8a8's activation maxima of the whole model (shards/compress/smoothing.py), read once."""
        if self._act_max is None:
            self._act_max = activation_maxima(source, self.calibration)
        return self._act_max

    def _add_layers(self, source: ModelSource, layers: LayerRange, todo: Compression) -> None:
        blocks, dropped = self._build_layers(source, layers, todo, self.dropped)
        self._commit_layers(blocks, dropped)

    def _build_layers(self, source: ModelSource, layers: LayerRange, todo: Compression,
                      dropped: set[int]) -> tuple[dict[int, Block], set[int]]:
        """Build and compress `layers` (calibrating first when `todo` needs it) without touching
        this stage: {layer: block} and the layers dropped. A failure leaves the stage as it was."""
        calibrated, dropped = {}, set(dropped)
        if todo.calibrated:
            calibrated, more = calibrated_blocks(source, layers, todo, lambda i: fp32_block(source, i),
                                                 self.calibration)
            dropped |= set(more)
        # calibrated blocks are already cut and pruned: only quantization is left
        rest = Compression(quant=todo.quant) if todo.calibrated else todo
        if not self.quantize:
            rest = dataclasses.replace(rest, quant="fp32")
        blocks = {}
        for layer in layers:
            if layer in dropped:
                continue
            maxima = self._maxima(source).get(layer) if rest.method.act_maxima else None
            block = calibrated.pop(layer, None)
            # a calibrated block was cut or pruned: its weights are no longer the source's codes
            blocks[layer] = build_block(source, layer, rest, self.device, self.dtype, maxima) if block is None \
                else compress_block(block.to(device=self.device, dtype=self.dtype), rest, None, maxima)
        return blocks, dropped & set(layers)

    def _commit_layers(self, blocks: dict[int, Block], dropped: set[int]) -> None:
        self.dropped |= dropped
        self._layers_run = None
        for layer, block in blocks.items():
            self.blocks[str(layer)] = block
            if layer not in self.kv.pools:
                self.kv.add_layer(layer)

    def grow(self, source: ModelSource, layers: LayerRange, kv: dict | None = None,
             dropped: list[int] = ()) -> None:
        """Take on neighbouring layers (loading only their tensors) and, for live sequences,
        their K/V: kv[seq_id][layer] = (k, v), each [length, n_kv, head_dim]. `dropped`: layers
        of the range the giving stage had dropped (they stay dropped). All or nothing: the range
        changes only after every layer is built, so a failed load leaves the stage as it was."""
        if layers.end == self.layers.start:
            new_range = LayerRange(layers.start, self.layers.end)
        elif layers.start == self.layers.end:
            new_range = LayerRange(self.layers.start, layers.end)
        else:
            raise RangeError(f"layers {layers} do not border this stage's {self.layers}")
        # moved layers are calibrated on their own; no new layers are dropped on a move
        blocks, gone = self._build_layers(source, layers, dataclasses.replace(self.todo, drop_layers=0),
                                          set(dropped))
        self._commit_layers(blocks, gone)
        self.layers = new_range
        self.import_kv(kv or {})
        self._warm()

    def import_kv(self, kv: dict) -> None:
        """kv[seq_id][layer] = (k, v), each [length, n_kv, head_dim]: live sequences' K/V for
        layers this stage holds. A stage that has not seen a sequence (a new actor after a split)
        reserves its blocks first."""
        for sid, per_layer in kv.items():
            for layer, (k, v) in per_layer.items():
                if self.kv.table.lengths.get(sid, 0) < k.shape[0]:
                    self.kv.table.reserve(sid, k.shape[0])
                self.kv.import_(sid, layer, k, v)

    def recompress(self, source: ModelSource, spec: str) -> None:
        """Rebuild every layer (and the embedding / lm_head) at another quantization, keeping the
        layers, the dropped set and the live KV. Only the quantization may change. Built in full
        before the swap (peak: old + new weights), so a failure leaves the stage as it was."""
        new = parse_compression(spec)
        if new.structure != self.compression.structure:
            raise CompressionError(f"recompress changes quantization only: {self.compression.spec} -> "
                                   f"{new.spec} changes cuts or pruning")
        if self.todo.structure.calibrated:
            raise CompressionError(f"this stage calibrated {self.todo.spec} at load; recompress needs "
                                   "the structure from a prepared artifact (shardserve prepare)")
        todo = dataclasses.replace(self.todo, quant=new.quant, gptq=new.gptq)   # gptq: calibrates again
        blocks, _ = self._build_layers(source, self.layers, todo, self.dropped)
        self._add_ends(source, new.quant)     # after the layers built: a failure changes nothing
        self._commit_layers(blocks, set())
        self.compression, self.todo = dataclasses.replace(self.compression, quant=new.quant), todo
        self._warm()

    def shrink(self, layers: LayerRange) -> dict:
        """Give up layers at either end; returns {"kv": their K/V for every live sequence,
        "dropped": the given-up layers this stage had dropped} (grow's arguments)."""
        if layers.start == self.layers.start and layers.end < self.layers.end and not self.is_first:
            self.layers = LayerRange(layers.end, self.layers.end)
        elif layers.end == self.layers.end and layers.start > self.layers.start and not self.is_last:
            self.layers = LayerRange(self.layers.start, layers.start)
        else:
            raise RangeError(f"cannot give up layers {layers} of this stage's {self.layers}: "
                             "only an end of the range that borders another stage, and not all of it")
        kept = [i for i in layers if i not in self.dropped]
        out = {sid: {layer: self.kv.export(sid, layer) for layer in kept} for sid in self.kv.table.lengths}
        self._layers_run = None
        for layer in kept:
            del self.blocks[str(layer)]
            self.kv.drop_layer(layer)
        gone = sorted(self.dropped & set(layers))
        self.dropped -= set(gone)
        if self.compiled is not None:
            self.compiled.drop_whole()    # its whole-stage graph was of the old layers: chunks now
        return {"kv": out, "dropped": gone}

    def _ordered(self):
        """This stage's layers as the compiled graphs take them (compiled.Layers: blocks, KV
        pools, attention kernel flags, in layer order), kept until the layers change."""
        if self._layers_run is None:
            from shards.model.compiled import Layers
            layers = sorted(int(k) for k in self.blocks)
            self._layers_run = Layers.of([self.blocks[str(i)] for i in layers], [self.kv.pools[i] for i in layers])
        return self._layers_run

    @property
    def runs_compiled(self) -> bool:
        """Decode steps are compiled (fused, or through the graph): compile was asked for and the
        quantization's kernels trace (bitsandbytes' modules do not: nf4, fp4 and int8 run eager)."""
        return self.compile and self.compression.method.compiles

    @property
    def runs_fused(self) -> bool:
        """Decode steps run as one C++ call (shards/model/fused.py)."""
        return self._fused_decode() is not None

    def _fused_decode(self):
        """The FusedDecode of the current layers, or None where they do not fit it."""
        if not self.compile:
            return None
        run = self._ordered()
        if self._fused is None or self._fused[0] is not run:
            from shards.model import fused
            fits = fused.fits(run.blocks, run.pools, self.dtype)
            self._fused = (run, fused.FusedDecode(run.blocks, run.pools, self.layers.start) if fits else None)
        return self._fused[1]

    @property
    def attention_kernel(self) -> bool:
        """Decode attention of every layer runs shards/model/attention.py's kernel (not the gather)."""
        return bool(self.blocks) and all(attention.supports(self.kv.pools[int(k)][0], b.n_heads, b.n_kv)
                                         for k, b in self.blocks.items())

    def _warm(self, whole: bool = False) -> None:
        """Compile (or load from the cache) what the current layers need, before any request;
        whole (at load only): also the graph of the whole stage (shards/model/compiled.py)."""
        if not self.compile:
            return
        if self.runs_fused:
            self._check_fused()
            return
        if not self.runs_compiled:
            log.warning("layers %s at %s run eager: only %s compile", self.layers, self.compression.quant,
                        ", ".join(m.name for m in registry.METHODS if m.compiles))
            return
        if self.compiled is None:
            from shards.model.compiled import CompiledDecode
            self.compiled = CompiledDecode(self.threads)
        # the first stage compiles its whole-stage graphs while later ones compile the layer
        # and chunk graphs all stages share (CompiledDecode._trace)
        self.compiled.warm(self._ordered(), self.config.hidden_size, self.kv.table.n_blocks,
                           self.kv.table.block_size, self.dtype, self.device, whole, lead=self.is_first)

    def _check_fused(self) -> None:
        """One fused step of two sequences on the pool's scratch block, before any request: the
        library is built (or found) and runs these layers."""
        x, slots, block_ids, _, lens, cos, sin = dummy_decode(2, 3, self.config.hidden_size, head_dim(self.config),
                                                              self.kv.table.n_blocks, self.kv.table.block_size,
                                                              self.dtype, self.device)
        with torch.inference_mode():
            self._fused_decode()(x, slots, block_ids, lens, cos[:, 0], sin[:, 0])

    def _load(self, source: ModelSource, name: str) -> torch.Tensor:
        """One tensor, straight to this stage's device and dtype (CPU peak: one tensor)."""
        return source.tensor(name).to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, all_logits: bool = False, extra: list[tuple[int, int]] = ()) -> torch.Tensor:
        """First/middle stages return hidden [B, Q, hidden]; the last returns logits
        [B, vocab] at each sequence's last new token, then those of the (row, position) pairs in
        `extra` ([B + len(extra), vocab]); with all_logits, [B, Q, vocab]."""
        self.check_step(batch)
        ctx = StepContext(batch, self.kv, self.rope)
        if self.is_first:
            x = self.embed(from_wire(batch.tokens).to(self.device)).to(self.dtype)
        else:
            x = from_wire(batch.hidden).to(device=self.device, dtype=self.dtype)
        fused = self._fused_decode() if batch.width == 1 else None
        if fused is not None:       # x: [B, 1, hidden] -> [B, hidden], a copy the call updates
            x = fused(x[:, 0].clone(memory_format=torch.contiguous_format), ctx.slots, ctx.block_ids, ctx.decode_lens,
                      ctx.rope[0][:, 0, 0].contiguous(), ctx.rope[1][:, 0, 0].contiguous()).unsqueeze(1)
            self.fused_steps += 1
        elif self.runs_compiled and batch.width == 1:
            # x: [B, 1, hidden] -> the graph's [B, hidden]; cos, sin: [B, 1, 1, hd] -> [B, 1, hd].
            # The copy makes a received hidden state an inference tensor, as the graphs were traced
            x = self.compiled(self._ordered(), x[:, 0].clone(), ctx.slots, ctx.block_ids, ctx.decode_bias, ctx.decode_lens,
                              ctx.rope[0][:, 0], ctx.rope[1][:, 0]).unsqueeze(1)
        else:
            for layer in sorted(int(k) for k in self.blocks):
                x = self.blocks[str(layer)](x, ctx.rope, self.kv, ctx)
        if not self.is_last:
            return x                                                   # all_logits: last stage only
        if not all_logits:
            rows, at = torch.arange(x.shape[0]), ctx.last
            if extra:
                rows = torch.cat([rows, torch.tensor([b for b, _ in extra])])
                at = torch.cat([at, torch.tensor([j for _, j in extra], dtype=at.dtype)])
            x = x[rows, at]                                            # [B + len(extra), hidden]
        return self.lm_head(self.norm(x)).float()

    def check_step(self, batch: StepBatch) -> None:
        """Refuse a step whose input is not at this stage's first layer (RangeError)."""
        if batch.layer != self.layers.start:
            raise RangeError(f"a step at layer {batch.layer} reached the stage of layers {self.layers}: "
                             f"the pipeline's ranges have a gap or an overlap before layer {self.layers.start}")

    def free(self, seq_id: int) -> None:
        self.kv.table.free(seq_id)

    def weight_bytes(self) -> int:
        """Resident bytes of this stage's parameters and buffers (tied weights counted once)."""
        return module_bytes(self)
