"""ShardActor: one stage hosted by a Ray actor (docs/design.md, "Shards").

`ShardWorker` is a plain class (testable without Ray); `start_shards` wraps it with
`ray.remote` and names the actors `shard-<k>` in the `shardserve` namespace.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections import deque

import psutil
import torch

from shards.compress import qmatmul
from shards.compress.spec import parse as parse_compression
from shards.errors import KVCacheFull
from shards.model import attention
from shards.model.logprobs import prompt_rows, step_logprobs
from shards.model.sampling import allow_only, sample
from shards.model.source import open_source
from shards.model.stage import Stage
from shards.model.step import Sampled, StepBatch, to_wire
from shards.plan.layer_range import LayerRange
from shards.plan.memory import module_bytes
from shards.plan.plan import ShardSpec
from shards.runtime.channel import ChannelServer, decode_step, encode_reply
from shards.runtime.cores import CoreShare, StepCores, decodes_alone
from shards.runtime.metrics import ShardMetrics
from shards.runtime.stats import ShardStats

NAMESPACE = "shardserve"
FAULTS_ENV = "SHARDSERVE_FAULTS"     # "1": inject_fault works (tests only)

log = logging.getLogger(__name__)


class ShardWorker:
    def __init__(self, model: str, spec: ShardSpec, kv_blocks: int, block_size: int = 16,
                 threads: int | None = None):
        # pipelined actors must not fight over the same cores: each gets its share, and all of
        # them for a step no other group overlaps (StepBatch.alone; shards/runtime/cores.py)
        share = threads or torch.get_num_threads()
        self.cores = CoreShare.of(spec, share, max(share, os.cpu_count() or 1))
        torch.set_num_threads(share)
        _keep_step_heap()
        self.model, self.spec = model, spec
        self.device = spec.device
        self.source = open_source(model)
        import transformers.models.llama.modeling_llama  # noqa: F401  (the stage imports it)
        if parse_compression(spec.compression).method.bitsandbytes:
            import bitsandbytes  # noqa: F401  (runtime, 44 MiB here: not the shard's weights)
        self.base_rss = private_rss()   # runtime + metadata, before weights
        t0 = time.time()
        with _own_mmaps():
            self.stage = Stage(self.source, spec.layers, kv_blocks, block_size, device=self.device,
                               compression=spec.compression, compile=spec.compile,
                               threads=(share, self.cores.all_cores) if self.cores.decode_alone else (share,))
        self.load_s = time.time() - t0   # reading, converting, quantizing and compiling its layers
        attention.use_team(qmatmul.team_hooks())   # decode attention on the kernel's team too
        # steps run on a Compiled Graph's thread (serving/control/pipeline.py), stats on the main one:
        # readers copy these deques with list() (atomic) before iterating
        self.busy: deque[tuple[float, float]] = deque(maxlen=512)  # (start, end) wall clock, s
        self.decode_steps: deque[tuple[float, float]] = deque(maxlen=1024)  # (end, seconds) of decode steps
        self.steps = 0
        self.budget_bytes = spec.budget_bytes
        self.faults: list[str] = []   # inject_fault: the next len(faults) steps raise these
        # steps arrive on channel threads (shards/runtime/channel.py) or a Compiled Graph's, changes and
        # frees on Ray's: one at a time (re-entrant: a step frees what rides on it)
        self._lock = threading.RLock()
        self.channel: ChannelServer | None = None
        self.holders: set[int] = set()   # prefix holders pinned here (serving/router/prefix.py): not requests
        self.metrics = _metrics(spec, lambda: (self.stage.kv.table.used_blocks, self.stage.kv.table.n_blocks))

    def ready(self) -> ShardStats:
        return self.stats()

    def ping(self) -> int:
        return os.getpid()

    def open_channel(self) -> dict:
        """Where routers send this shard's steps (shards/runtime/channel.py): host, port and the secret a
        connection must present; one listening socket per actor, opened at the first call."""
        if self.channel is None:
            self.channel = ChannelServer(self._step_frame, _node()[0] or "127.0.0.1")
        host, port = self.channel.address
        return {"host": host, "port": port, "secret": self.channel.secret}

    def _step_frame(self, header: dict, body) -> tuple[dict, bytes]:
        return encode_reply(self.forward(decode_step(header, body)))

    def forward(self, batch: StepBatch):
        """Hidden states on to the next shard, or (last shard) sampled token ids."""
        with self._lock:
            return self._forward(batch)

    def _forward(self, batch: StepBatch):
        t0 = time.time()
        self.stage.check_step(batch)         # before any free or copy: a refused step changes nothing
        self._copy(batch.pins, must=False)   # before the frees: a pin may read a sequence freed here
        self.free(batch.free)
        self._copy(batch.copies, must=True)  # after: a re-prefilled id is freed first
        if self.faults:
            raise ShardFault(f"shard {self.spec.index}: {self.faults.pop(0)}")
        cores = StepCores(torch.get_num_threads(), 1, 1)   # a GPU step keeps what it has
        if self.device == "cpu":
            cores = self.cores.step(batch.alone, batch.width, sum(batch.q_lens))
            if torch.get_num_threads() != cores.threads:
                torch.set_num_threads(cores.threads)
        with qmatmul.stepping(self.cores.team > 1), qmatmul.team(cores.team), qmatmul.lend(cores.lend):
            out = self._compute(batch)
        t1 = time.time()
        if self.metrics:
            self.metrics.stepped(t1 - t0, batch.width == 1)
        self.busy.append((t0, t1))
        if batch.width == 1:   # a decode step: one token per sequence
            self.decode_steps.append((t1, t1 - t0))
        self.steps += 1
        return out

    def _compute(self, batch: StepBatch):
        extra = prompt_rows(batch) if self.stage.is_last else []
        out = self.stage(batch, extra=extra)
        # hidden states and logits leave the device: the next hop may be another node or GPU
        if self.stage.is_last:
            logits = out.cpu()
            tokens = sample(allow_only(logits[:len(batch.seq_ids)], batch.masks), batch.sampling, batch.steps)
            return Sampled(tokens.tolist(), step_logprobs(logits, tokens, batch, extra))
        return batch.with_hidden(to_wire(out.cpu()), self.stage.layers.end)

    def _copy(self, copies, must: bool) -> None:
        """Cached prompt prefixes (serving/router/prefix.py): [dst, src, tokens] each. A pin whose
        sequence this shard no longer holds (aborted while its pin waited) is skipped: the
        holder is then missing here, and a copy from it raises, so that group is recomputed and
        the router drops the holder."""
        for dst, src, n in copies:
            try:
                self.stage.kv.copy_prefix(dst, src, n)
                if not must:
                    self.holders.add(dst)
            except (KeyError, KVCacheFull):
                if must:
                    raise
                log.warning("shard %d: prefix pin %d from sequence %d skipped: not held here", self.spec.index, dst, src)

    def free(self, seq_ids: list[int]) -> None:
        with self._lock:
            for sid in seq_ids:
                self.stage.free(sid)
                self.holders.discard(sid)

    def reset_peak(self) -> int:
        """Start peak_rss_bytes afresh from the current RSS (Linux: /proc/self/clear_refs), so a
        peak read later is the serving peak, not the load's; returns the RSS it starts from."""
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:   # not Linux: the peak stays the process's
            pass
        return private_rss()

    def free_all(self) -> int:
        """Free every sequence's KV (a new router attaching); returns how many there were."""
        live = list(self.stage.kv.table.lengths)
        self.free(live)
        return len(live)

    def grow(self, layers: LayerRange, handoff: dict) -> ShardStats:
        """handoff: the giving shard's shrink() result (K/V of live sequences, dropped layers)."""
        with self._lock, _own_mmaps():
            self.stage.grow(self.source, layers, handoff["kv"], handoff["dropped"])
        return self.stats()

    def shrink(self, layers: LayerRange) -> dict:
        with self._lock, _own_mmaps():   # the handoff's K/V copies too: freed with it once sent
            return self.stage.shrink(layers)

    def adopt(self, handoff: dict) -> ShardStats:
        """A new actor (after a split) takes the live K/V of the layers it was built with."""
        with self._lock, _own_mmaps():
            self.stage.import_kv(handoff["kv"])
        return self.stats()

    def recompress(self, compression: str) -> ShardStats:
        """The same layers at another quantization (live KV kept); stats after."""
        with self._lock, _own_mmaps():
            self.stage.recompress(self.source, compression)
        self.spec = dataclasses.replace(self.spec, compression=compression)
        attention.use_team(qmatmul.team_hooks())
        # the team follows the new spec; torch's threads for alone decode steps do not: the
        # stage's graphs were compiled for the thread counts of the spec it was built with
        self.cores = dataclasses.replace(self.cores, team=CoreShare.of(self.spec, self.cores.threads,
                                                                       self.cores.all_cores).team)
        return self.stats()

    def set_budget(self, budget_bytes: int | None) -> ShardStats:
        """The bytes this shard may hold for its tensors (weights + KV + workspace); the
        controller compares it with the measured use."""
        self.budget_bytes = budget_bytes
        return self.stats()

    def decode_ms(self, since: float = 0.0) -> float | None:
        """Median milliseconds of this shard's decode steps that ended after `since` (epoch s)."""
        xs = sorted(d for t, d in list(self.decode_steps) if t >= since)   # list(): one atomic copy
        return 1000 * xs[len(xs) // 2] if xs else None

    def inject_fault(self, steps: int = 1, message: str = "injected fault") -> None:
        """Fault injection for tests and chaos runs, only where the shard's process was started
        with SHARDSERVE_FAULTS=1 (tests/conftest.py sets it): the next `steps` forward calls
        raise (0: none). Elsewhere it refuses, so no client of a deployment can break a shard."""
        if os.environ.get(FAULTS_ENV) != "1":
            raise PermissionError(f"fault injection is off in this shard; it needs {FAULTS_ENV}=1 in its environment")
        self.faults = [message] * steps

    def stats(self) -> ShardStats:
        """Measured numbers: RSS, weight and KV bytes, step timings. The heap pages that steps'
        temporaries left free go back to the OS first (_keep_step_heap keeps them between steps),
        so RSS counts what the shard holds, as the controller and the plan's budget mean it:
        measured under load, 90 MiB of shard 0's RSS after a 9-layer move was such free heap."""
        _trim_heap()
        busy = list(self.busy)                 # steps append on the graph's thread: one atomic copy
        times = [e - s for s, e in busy]
        node = _node()
        return ShardStats(
            start=self.stage.layers.start, end=self.stage.layers.end, device=self.device,
            compression=self.spec.compression, pid=os.getpid(), node=node[0], node_id=node[1],
            rss_bytes=private_rss(), peak_rss_bytes=peak_rss(), base_rss_bytes=self.base_rss,
            weight_bytes=self.stage.weight_bytes(), **self._kv_use(),
            kv_bytes_reserved=self.stage.kv.bytes_reserved(), budget_bytes=self.budget_bytes, steps=self.steps,
            layer_bytes=self._layer_bytes(), node_available_bytes=psutil.virtual_memory().available,
            step_ms_mean=1000 * sum(times) / len(times) if times else 0.0,
            compiled=self.stage.runs_compiled, fused=self.stage.runs_fused, attention_kernel=self.stage.attention_kernel,
            **self._compile_stats(), load_s=round(self.load_s, 2), busy=tuple(busy))

    def _kv_use(self) -> dict:
        """KV held for requests, and apart from it what the prefix holders keep (a cache: the
        router frees it under pressure), in blocks and bytes."""
        kv, table = self.stage.kv, self.stage.kv.table
        held = sum(len(table.blocks.get(h, [])) for h in self.holders)
        per_block = kv.bytes_reserved() // kv.shape[1]
        return {"kv_blocks_used": table.used_blocks - held, "kv_bytes_used": (table.used_blocks - held) * per_block,
                "live_sequences": len(table.lengths) - len(self.holders & set(table.lengths)),
                "prefix_holders": len(self.holders), "prefix_blocks": held}

    def _compile_stats(self) -> dict:
        """Seconds this shard spent compiling or loading graphs (at load and after each change of
        its layers), the graphs dynamo built for it, and the decode steps that ran them and that
        ran fused."""
        c = self.stage.compiled
        graph = {"compile_s": round(c.warm_s, 2), "graphs": c.graphs, "compiled_steps": c.steps} if c else \
            {"compile_s": 0.0, "graphs": 0, "compiled_steps": 0}
        return {**graph, "fused_steps": self.stage.fused_steps}

    def _layer_bytes(self) -> int:
        """Mean resident bytes one of this stage's decoder layers costs: weights + its KV pool
        (what moving one layer to a neighbour frees here)."""
        blocks = list(self.stage.blocks.values())
        if not blocks:
            return 0
        kv = self.stage.kv.bytes_reserved() // max(1, len(self.stage.kv.pools))
        return sum(module_bytes(b) for b in blocks) // len(blocks) + kv


class ShardFault(RuntimeError):
    """A step failed inside a shard (injected, or a bug surfaced as an exception)."""


def _metrics(spec: ShardSpec, kv_blocks) -> ShardMetrics | None:
    """The shard's Prometheus series, tagged with its actor name; None outside a Ray actor."""
    import ray
    if not ray.is_initialized():
        return None
    return ShardMetrics(ray.get_runtime_context().get_actor_name() or f"shard-{spec.index}", kv_blocks)


def private_rss() -> int:
    """This process's resident bytes less shared-memory pages (RssShmem): those are Ray's object
    store's, which Ray accounts for. A step handoff's K/V goes through the store, and the pages
    the giving shard wrote stay resident in its RSS: after a 9-layer move under 32 requests, 32
    MiB of shard 0's RSS was RssShmem, so the move looked to free 146 of its 170 MiB and the
    controller saw the shard still over its budget. Falls back to RSS off Linux."""
    try:
        with open("/proc/self/status") as f:
            kb = {x.split(":")[0]: int(x.split()[1]) for x in f if x.startswith(("RssAnon:", "RssFile:"))}
        return (kb["RssAnon"] + kb["RssFile"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM; falls back to current RSS off Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return psutil.Process().memory_info().rss


# glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (mallopt's parameter numbers)
_MMAP_THRESHOLD, _TRIM_THRESHOLD = -3, -1
OWN_MMAP_BYTES = 1 << 20     # while layers load or move: every tensor of 1 MiB and up is an mmap
STEP_HEAP_BYTES = 32 << 20   # while serving: glibc's largest threshold; step temporaries reuse heap


def _mallopt(param: int, value: int) -> None:
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):   # not glibc
        pass


def _keep_step_heap() -> None:
    """A step's temporaries (prefill activations, w8a8 accumulators, dequantized GEMM chunks,
    logits: 1-10 MiB each) come from heap pages that stay mapped between steps. As mmaps of their
    own, every step page-faulted them in afresh: a prefill of 3 prompts through layers [0, 17)
    took 296-324 ms instead of 147-151 (w8a8, 1 thread, in process); served at 32 concurrent
    requests, shard 0's prefill steps 314-338 -> 229-234 ms, TTFT p50 2.40 -> 1.42-1.63 s. The
    heap's top is not trimmed after each step either; malloc_trim after load changes returns it."""
    _mallopt(_TRIM_THRESHOLD, 2 * STEP_HEAP_BYTES)
    _mallopt(_MMAP_THRESHOLD, STEP_HEAP_BYTES)


@contextlib.contextmanager
def _own_mmaps():
    """Load, grow, shrink, adopt, recompress: tensors of 1 MiB and up that the heap's free chunks
    cannot hold get mmaps of their own (all of them at load, when the heap is still empty), so
    freeing them (a move, a recompress) returns their pages at once. glibc's default threshold
    adapts upwards after the first large free, and then dropped layers stayed resident in the
    heap: measured on a 10-layer move under load, RSS fell 112 MiB for 195 MiB of freed tensors.
    Afterwards step temporaries go back to the heap (_keep_step_heap), and malloc_trim hands
    back the free pages the change left there (new layers carved from the heap included)."""
    _mallopt(_MMAP_THRESHOLD, OWN_MMAP_BYTES)
    try:
        yield
    finally:
        _mallopt(_MMAP_THRESHOLD, STEP_HEAP_BYTES)
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Dropped layers may still be held by reference cycles; collect them, then trim."""
    import gc
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """glibc keeps freed heap pages mapped, so freed tensors would not lower RSS; malloc_trim
    hands them back."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _node() -> tuple[str | None, str | None]:
    """(IP, Ray node id) of the node this actor runs on; (None, None) outside Ray."""
    try:
        import ray
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
    except Exception:
        return None, None


def start_shards(model: str, specs: list[ShardSpec], kv_blocks: int, block_size: int = 16,
                 prefix: str = "", threads: list[int] | None = None) -> list:
    """One named Ray actor per spec (`<prefix>shard-<k>`), or the running one of that name.
    threads: torch threads of each (default: this machine's cores shared evenly)."""
    threads = threads or [max(1, (os.cpu_count() or 1) // len(specs))] * len(specs)
    return [start_shard(model, spec, kv_blocks, block_size, f"{prefix}shard-{spec.index}", t)
            for spec, t in zip(specs, threads)]


def start_shard(model: str, spec: ShardSpec, kv_blocks: int, block_size: int, name: str,
                threads: int, attach: bool = True):
    """One shard actor with its share of this node's cores or one GPU, on spec.node when set.
    attach=False refuses a running actor of that name (a replacement must never adopt the dead
    one's handle); a replacement prefers spec.node but goes elsewhere when that node is gone."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    gpu = spec.device.startswith("cuda")
    options = dict(
        name=name, namespace=NAMESPACE, num_gpus=1 if gpu else 0,
        # threads, not Ray's CPU slots, share the cores: 0 logical CPUs keeps small machines
        # from deadlocking Serve's own actors
        num_cpus=0,
        # no Ray restart: a restarted actor would rebuild its *original* spec, stale after moves;
        # the router re-places a dead shard with its current spec instead (serving/control/pipeline.py)
        max_restarts=0, max_concurrency=1, get_if_exists=attach,   # the CLI starts them; Serve attaches
        # detached: a Serve replica that restarts (or a request cancelled mid-build) must not
        # take the loaded shards with it; whoever ends the service kills them (stop_pipeline)
        lifetime="detached")
    if spec.node:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(spec.node, soft=not attach)
    if decodes_alone(spec):     # read when OpenMP loads, before the actor's code runs
        options["runtime_env"] = {"env_vars": {"GOMP_SPINCOUNT": "0"}}
    return ray.remote(ShardWorker).options(**options).remote(model, spec, kv_blocks, block_size, threads)


def stop_pipeline(prefix: str = "", keep: str | None = None) -> list[str]:
    """Kill every named actor of the pipelines of `prefix`: `<prefix>[<fingerprint>-][r<k>-]`
    shards (replacements and split-off ones too) and controllers. keep: a fingerprint whose
    actors are spared, so only other deployments' (stale) pipelines go. Returns the names."""
    import re

    import ray
    ours = re.compile(re.escape(prefix) + r"(?:([0-9a-f]{8})-)?(?:r\d+-)?(?:shard-\d+|controller)$")
    killed = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        name, m = a["name"], ours.match(a["name"])
        if a["namespace"] != NAMESPACE or not m or (keep is not None and m.group(1) in (keep, None)):
            continue
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
            killed.append(name)
        except ValueError:   # died meanwhile
            pass
    return killed
