"""The compiled decode step: one decoder layer's decode through torch.compile (inductor).

A stage whose layers fit shards/model/fused.py (our group kernel's specs on the CPU, the default)
decodes through that one C++ call instead and never builds these graphs; they serve every
other spec that compiles, and CUDA.

One graph serves every layer of a stage: dynamo takes a block's weights as graph inputs (it
inlines nn modules), so the 15 layers of a shard, and layers a re-shard moves in later, all run
the graph traced once. Measured here (15 w8a16 layers, batch 1, 2 threads): cold compile
8.6 s per layer graph vs 34.5 s for the whole stage as one graph, the same step time (9.4 vs
9.5 ms; eager 11.5 ms).

Shapes are dynamic (batch, KV length), so two graphs cover every decode step: batch 1 and batch
>= 2 (dynamo specializes size-1 dimensions; StepContext pads a sequence's block list to at
least MIN_BLOCKS so the KV length never does). Both are compiled at load (`warm`); requests run
under the stance `fail_on_recompile`, so a step that would need a new graph raises instead of
compiling for minutes mid-request or falling back to eager unseen. Dynamo also guards on torch's
thread count, so each count a shard steps with gets its two graphs. Compiled graphs persist in
inductor's on-disk cache ($TORCHINDUCTOR_CACHE_DIR, set in shards/__init__.py): a restart or a
re-shard loads them in seconds.

Runs of CHUNK layers take a second graph, of CHUNK layers at once: each graph call costs ~100
us of dynamo lookup and wrappers besides its kernels, 19 calls a step on the first shard. A
stage of n layers makes n // CHUNK chunk calls and runs the rest one layer at a time, so still
two graph kinds (chunk, layer) serve any layer count and a re-shard compiles nothing new. Layers
[0, 19), w4a8x2, batch 1, 1 thread: one graph for all 19 layers took 6.7-7.3 ms a step
against 8.7-9.0 ms for 19 layer calls (4 interleaved rounds of 20 steps), but needs a new graph
for every layer count.

The stage's own layer count takes a third graph, compiled at load: the whole stage in one call
(chunk_decode over every layer), since even chunks leave ~0.1 ms of lookup and wrappers per call
([0, 19) is 2 chunks and 3 layers). Layers [0, 19), w4a8x2, batch 1, 1 thread, 12 interleaved
rounds of 30 steps in one process: median 5.31 against 6.12 ms a step with chunks of 8. A
re-shard (or a recompress) changes what that graph was traced for, so from then on the stage
runs chunks and layers again: it compiles nothing new while requests wait.

Attention reads the paged KV pool in place, never copying a sequence's whole cache per layer
(PagedKV.gather, the eager fallback). On CPU with fp32 KV it is shards/model/attention.py's kernel, an
op in the graph; elsewhere (CUDA, bf16 KV, a head layout without a kernel) scores and outputs
are written as reductions over indexed pool elements, which inductor fuses into one loop nest.
There, blocks and slots within a block stay two axes of those reductions: with one flattened
token axis, every vector load divided its token index by the block size (a symbolic size, so a
real 64-bit division) and took its remainder. Two axes halved that fused kernel (layers [0, 15),
w8a8, batch 16, 300 tokens of KV, 1 thread: 2.23 -> 1.13 ms a layer); the kernel takes
0.43-0.63 ms there (the fused loop with its neighbours 0.87).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import types

import torch

from shards import compat
from shards.errors import ShardServeError
from shards.model import attention
from shards.model.kv_cache import write_slots
from shards.model.step_context import MIN_BLOCKS, dummy_decode

log = logging.getLogger(__name__)

WARM_SHAPES = ((1, MIN_BLOCKS), (3, MIN_BLOCKS + 3))   # (batch, blocks): distinct sizes, no
                                                        # accidental equalities for dynamo to guard on
CHECK_SHAPE = (2, MIN_BLOCKS + 1)                       # must run without compiling again
# Steps check only the guards that tell this function's graphs apart (batch 1 or more, thread
# count, head counts, the attention kernel flag: the profiler's region ids show each step still
# takes its own graph), not all ~20 us of them per layer call: every input is built by
# StepContext the way the warm-up built it, and a step no graph fits still fails to recompile.
# Layers [0, 19), w4a8x2, batch 1, 1 thread, 16 interleaved rounds of 20 steps: median 7.57
# against 8.26 ms a step. SHARDSERVE_SKIP_GUARDS=0 checks them all (A/B runs).
SKIP_GUARDS = os.environ.get("SHARDSERVE_SKIP_GUARDS", "1") != "0"
# Past that, a step's graph calls skip dynamo altogether: at a call's first step (the whole
# stage, a chunk or a layer, at batch 1 or more, at a thread count), the cache entry whose
# guards its inputs pass is bound, and later steps call its transformed bytecode (what dynamo
# runs after a lookup: it unpacks the blocks' tensors and calls the graph) directly. Layers
# [0, 19), w4a8x2, batch 1, 1 thread, 4 alternating rounds of 200 calls on an EPYC: 2.35-2.38
# against 2.91-2.96 ms a call through dynamo, the same output. SHARDSERVE_DIRECT_GRAPH=0 goes
# through dynamo (A/B runs).
DIRECT_GRAPH = SKIP_GUARDS and os.environ.get("SHARDSERVE_DIRECT_GRAPH", "1") != "0"
_SET_STANCE = compat.set_stance()   # read once: a step does not look it up again
CHUNK = 8   # layers per call of the chunk graph


def layer_decode(block, x, k_pool, v_pool, slots, block_ids, bias, lens, cos, sin, kernel: bool):
    """One token per sequence through one decoder layer.

    x: [B, hidden]; k_pool, v_pool: [kv_heads, blocks + 1, block_size, head_dim] (written in
    place at `slots` [B]); block_ids: [B, nb]; bias: [B, 1, nb * block_size] (0 or -inf); lens:
    [B] keys each sequence attends; cos, sin: [B, 1, head_dim]. kernel: attention through
    shards/model/attention.py's kernel (else inductor's reductions below). Returns [B, hidden]."""
    b = x.shape[0]
    nh, nkv, hd = block.n_heads, block.n_kv, block.head_dim
    q, k, v = block.qkv(x, cos, sin)                                    # [B, heads | kv, hd]
    write_slots(k_pool, slots, k)
    write_slots(v_pool, slots, v)
    if kernel:
        a = torch.ops.shardserve.paged_decode_attention(q, k_pool, v_pool, block_ids, lens, hd ** -0.5)
        return block.out(x, a.reshape(b, nh * hd))
    # [kv, B, nb, bs, hd], never materialized by inductor; blocks and slots stay two axes, since
    # one flattened token axis made every load divide its index by the (symbolic) block size
    keys, values = k_pool[:, block_ids], v_pool[:, block_ids]
    nb, bs = keys.shape[2], keys.shape[3]
    q = q.reshape(b, nkv, nh // nkv, 1, 1, hd).transpose(0, 1)          # [kv, B, group, 1, 1, hd]
    scores = (q * keys.unsqueeze(2)).sum(-1) * hd ** -0.5 + bias.view(1, b, 1, nb, bs)  # [kv, B, group, nb, bs]
    p = scores.flatten(3).softmax(-1).view_as(scores).unsqueeze(-1)     # [kv, B, group, nb, bs, 1]
    a = (p * values.unsqueeze(2)).sum((3, 4))                           # [kv, B, group, hd]
    return block.out(x, a.transpose(0, 1).reshape(b, nh * hd))


def chunk_decode(blocks: tuple, pools: tuple, x, slots, block_ids, bias, lens, cos, sin,
                 kernels: tuple):
    """layer_decode through len(blocks) consecutive layers, traced as one graph. pools: each
    layer's (k_pool, v_pool); kernels: each layer's `kernel` flag."""
    for block, (k_pool, v_pool), kernel in zip(blocks, pools, kernels):
        x = layer_decode(block, x, k_pool, v_pool, slots, block_ids, bias, lens, cos, sin, kernel)
    return x


# The whole-stage graph: chunk_decode under a code object of its own, since dynamo keeps graphs per
# code object, so a step's lookup walks only whole-stage graphs, not the chunk graphs too. Layers
# [0, 19), 3 alternating runs of 10 x 30 steps: median 7.33, 7.20, 7.02 against 7.54, 8.07, 7.94 ms
# through chunk_decode's cache. The lookup still checks every tensor input's guard (skip_guard_
# eval_unsafe keeps tensor guards; dynamo's recursive dict tags were slower here): ~0.4 ms a call
# at 19 layers, by the profiler. Another name: code objects compare by value.
stage_decode = types.FunctionType(chunk_decode.__code__.replace(co_name="stage_decode"), chunk_decode.__globals__,
                                  "stage_decode")


class CompileError(ShardServeError):
    """The decode step could not be compiled at load."""


class CompiledDecode:
    """The compiled layer_decode of one stage, with its warm-up and counters."""

    def __init__(self, threads: tuple[int, ...]):
        # graphs live on layer_decode's and chunk_decode's code objects, shared by every stage of
        # the process: one per (model shape, head counts, kernel flags, thread count, batch 1 or more).
        # Past the limit dynamo would run eager silently; it raises instead.
        dynamo = compat.dynamo_config()
        dynamo.recompile_limit = max(dynamo.recompile_limit, 128)
        dynamo.fail_on_recompile_limit_hit = True
        # no size / stride asserts around each extern kernel (our qmatmul and attention ops): ~4%
        # of a step ([0, 19), w4a8x2, batch 1: 7.82 / 7.24 against 8.13 / 7.58 ms, both configs
        # run at once, one per core, then cores swapped). test_compiled's equality with the
        # eager path stands in for them. (inductor's cpp_wrapper took 0.23 ms more off that step
        # but 1 m 50 s instead of ~25 s to compile cold: not taken.)
        compat.inductor_config().size_asserts = False
        self.fn = torch.compile(layer_decode, dynamic=True, fullgraph=True)
        self.chunk_fn = torch.compile(chunk_decode, dynamic=True, fullgraph=True)
        self.stage_fn = torch.compile(stage_decode, dynamic=True, fullgraph=True)
        self.chunk = CHUNK      # read here, not at import: tests set a smaller one
        self.whole: int | None = None   # the layer count the whole-stage graph was warmed for
        # (graph, first layer, batch is 1, thread count) -> that call's bytecode, called without
        # dynamo (DIRECT_GRAPH), or False where none fits; cleared when the stage's layers change
        self.direct: dict[tuple, types.FunctionType | bool] = {}
        # dynamo guards on torch's thread count: one set of graphs for each count steps use
        self.threads = sorted(set(threads))
        self.warm_s = 0.0       # seconds spent in warm-ups (compiling or loading from the cache)
        self.graphs = 0         # graphs dynamo built for this stage (others may already exist)
        self.steps = 0          # decode steps run through the graphs

    def __call__(self, run: Layers, *inputs) -> torch.Tensor:
        """inputs: x, slots, block_ids, bias, lens, cos, sin of layer_decode; returns x after
        every block of run."""
        self.steps += 1
        if not DIRECT_GRAPH:
            return self._run(run, *inputs)
        return self._layers(run, *inputs, call=self._step_call)

    def _run(self, run: Layers, *inputs) -> torch.Tensor:
        with _SET_STANCE("fail_on_recompile", skip_guard_eval_unsafe=SKIP_GUARDS):
            return self._layers(run, *inputs)

    def _step_call(self, key: tuple, fn, code, args: tuple) -> torch.Tensor:
        """fn(*args) for a step: through the bytecode bound for key (at the key's first step,
        from the first of code's cache entries whose guards args pass, as dynamo's lookup would
        take it), else through dynamo, which must not compile."""
        key = (*key, torch.get_num_threads())
        direct = self.direct.get(key)
        if direct is None:     # False: no entry's guards passed; no graph is compiled meanwhile
            direct = self.direct[key] = _bind(code, args) or False
        if direct:
            return direct(*args)
        with _SET_STANCE("fail_on_recompile", skip_guard_eval_unsafe=SKIP_GUARDS):
            return fn(*args)

    def _layers(self, run: Layers, x, *rest, call=None) -> torch.Tensor:
        """The whole stage in one call where its graph was warmed for these layers; else whole
        chunks through the chunk graph and the remaining layers one at a time. call(key, fn,
        code, args) makes each graph call (default: fn(*args)); key names the call's place in
        the stage and whether the batch is 1."""
        call, one = call or _plain, x.shape[0] == 1
        if len(run.blocks) == self.whole:
            return call(("whole", 0, one), self.stage_fn, stage_decode.__code__, run.args(x, *rest))
        x = self._chunks(run, x, *rest, call=call)
        for j in range(self._chunked(len(run.blocks)), len(run.blocks)):
            (kp, vp), block = run.pools[j], run.blocks[j]
            x = call(("layer", j, one), self.fn, layer_decode.__code__, (block, x, kp, vp, *rest, run.kernels[j]))
        return x

    def _chunked(self, n: int) -> int:
        """Layers of n that run in whole chunks; the rest run one at a time."""
        return n - n % self.chunk

    def _chunks(self, run: Layers, x, *rest, call=None) -> torch.Tensor:
        """x after the stage's whole chunks of layers, through the chunk graph."""
        call, one = call or _plain, x.shape[0] == 1
        for i in range(0, self._chunked(len(run.blocks)), self.chunk):
            x = call(("chunk", i, one), self.chunk_fn, chunk_decode.__code__, run[i:i + self.chunk].args(x, *rest))
        return x

    def drop_whole(self) -> None:
        """The stage's layers changed: steps run chunks and layers until the next load."""
        self.whole = None
        self.direct = {}

    def warm(self, run: Layers, hidden: int, scratch_block: int, block_size: int,
             dtype: torch.dtype, device, whole: bool = False, lead: bool = True) -> None:
        """Compile (or load) every graph the stage's layers need, on the pool's scratch block
        (no sequence's KV is touched), then prove a third shape runs without compiling. whole:
        also the graph of all these layers in one call (at load; a re-shard passes False).
        lead: the pipeline's first stage, which compiles its own graphs first (see _trace)."""
        counters = compat.dynamo_counters()
        self.drop_whole()
        t0, before = time.time(), counters["stats"]["unique_graphs"]
        head_dim = run.pools[0][0].shape[-1] if run.pools else 1
        dummy = lambda b, nb: dummy_decode(b, nb, hidden, head_dim, scratch_block, block_size, dtype, device)  # noqa: E731
        try:
            self._trace(run, dummy, device.type == "cpu", whole and len(run.blocks) not in (1, self.chunk), lead)
        except Exception as e:
            # e.g. no C++ compiler on the node (inductor builds its CPU kernels with g++)
            first = str(e).strip().splitlines()[0][:300]
            raise CompileError(f"compiling the decode step for {len(run.blocks)} layer(s) failed: "
                               f"{type(e).__name__}: {first}. Serve with --no-compile (compile: false) "
                               "to decode eagerly") from e
        new = counters["stats"]["unique_graphs"] - before
        self.graphs += new
        self.warm_s += time.time() - t0
        log.info("compiled decode: %d new graph(s) for %d layer(s) in %.1f s", new, len(run.blocks), time.time() - t0)

    def _trace(self, run: Layers, dummy, cpu: bool, whole: bool, lead: bool) -> None:
        """Every layer alone and the stage's chunks at every warm shape (and, `whole`, all layers
        in one call), for each thread count (CPU), then the check shape under fail_on_recompile
        (through the whole-stage graph where there is one). Every layer alone and the chunks: a
        re-shard may leave any layer outside a chunk, and any run of layers in one.

        The layer and chunk graphs of one model's stages are the same graphs, while the
        whole-stage graph is the stage's own. So the lead (first) stage compiles its whole-stage
        graphs first and then finds the layer and chunk graphs in inductor's cache, compiled
        meanwhile by the other shards, which take them first. Default model, cold caches, 1
        thread: layers [0, 19) compile the layer and chunk graphs in 44 s and their whole-stage
        graphs in 38 s; layers [19, 30) then load the layer and chunk graphs in 15 s."""
        was = torch.get_num_threads()
        try:
            for n in self.threads if cpu else [was]:
                torch.set_num_threads(n)
                with torch.inference_mode():
                    if whole and lead:
                        self._warm_whole(run, dummy)
                    for kind in (self._warm_layers, self._chunks):
                        for b, nb in WARM_SHAPES:
                            kind(run, *dummy(b, nb))
                    if whole and not lead:
                        self._warm_whole(run, dummy)
                    self._run(run, *dummy(*CHECK_SHAPE))
        finally:
            torch.set_num_threads(was)

    def _warm_whole(self, run: Layers, dummy) -> None:
        """The whole-stage graph at every warm shape; steps take it from now on."""
        self.whole = len(run.blocks)
        for b, nb in WARM_SHAPES:
            self._layers(run, *dummy(b, nb))

    def _warm_layers(self, run: Layers, x, *rest) -> None:
        """Every layer alone through the layer graph (not chained: only its graphs matter)."""
        for block, (kp, vp), kernel in zip(run.blocks, run.pools, run.kernels):
            self.fn(block, x, kp, vp, *rest, kernel)


def _plain(key: tuple, fn, code, args: tuple) -> torch.Tensor:
    return fn(*args)


def _bind(code, args: tuple) -> types.FunctionType | None:
    """The transformed bytecode of the first of dynamo's cache entries for `code` whose guards
    `args` pass (what dynamo runs after a lookup: it unpacks the inputs and calls the graph),
    as a function of code's arguments; None where none passes."""
    names = code.co_varnames[:code.co_argcount]
    for entry in compat.dynamo_cache_entries()(code):
        if entry.guard_manager.check(dict(zip(names, args))):
            return types.FunctionType(entry.code, chunk_decode.__globals__, code.co_name + "_direct")
    return None


@dataclasses.dataclass(frozen=True)
class Layers:
    """A run of consecutive layers as the graphs take them: their blocks, (k_pool, v_pool) and
    whether each one's attention takes shards/model/attention.py's kernel (a constant of its
    graph). The stage keeps its own until its layers change: built per step, this took ~2% of
    a step (the layer order sorted, every layer's kernel flag asked)."""

    blocks: tuple
    pools: tuple
    kernels: tuple[bool, ...]

    @classmethod
    def of(cls, blocks, pools) -> "Layers":
        return cls(tuple(blocks), tuple(pools),
                   tuple(attention.supports(kp, b.n_heads, b.n_kv) for b, (kp, _) in zip(blocks, pools)))

    def __getitem__(self, part: slice) -> "Layers":
        return Layers(self.blocks[part], self.pools[part], self.kernels[part])

    def args(self, x, *rest) -> tuple:
        """chunk_decode's (and stage_decode's) arguments for these layers and a step's inputs."""
        return (self.blocks, self.pools, x, *rest, self.kernels)
