"""ShardActor: one stage hosted by a Ray actor (DESIGN.md section 3).

`ShardWorker` is a plain class (testable without Ray); `start_shards` wraps it with
`ray.remote` and names the actors `shard-<k>` in the `shardserve` namespace.
"""
from __future__ import annotations

import os
import time
from collections import deque

import psutil
import torch

from shards.compression import parse as parse_compression
from shards.layer_range import LayerRange
from shards.plan import ShardSpec
from shards.sampling import sample
from shards.source import open_source
from shards.stage import Stage
from shards.step import StepBatch

NAMESPACE = "shardserve"


class ShardWorker:
    def __init__(self, model: str, spec: ShardSpec, kv_blocks: int, block_size: int = 16,
                 threads: int | None = None):
        # pipelined actors must not fight over the same cores: each gets its share, and all of
        # them for a step no other group overlaps (StepBatch.alone)
        self.threads = threads or torch.get_num_threads()
        self.all_cores = max(self.threads, os.cpu_count() or 1)
        torch.set_num_threads(self.threads)
        self.model, self.spec = model, spec
        self.device = spec.device
        self.source = open_source(model)
        import transformers.models.llama.modeling_llama  # noqa: F401  (the stage imports it)
        if parse_compression(spec.compression).quant in ("int8", "nf4", "fp4"):
            import bitsandbytes  # noqa: F401  (runtime, 44 MiB here: not the shard's weights)
        self.base_rss = psutil.Process().memory_info().rss   # runtime + metadata, before weights
        self.stage = Stage(self.source, spec.layers, kv_blocks, block_size, device=self.device,
                           compression=spec.compression)
        _release_freed_memory()   # load-time temporaries back to the OS
        self.busy: deque[tuple[float, float]] = deque(maxlen=512)  # (start, end) wall clock, s
        self.steps = 0

    def ready(self) -> dict:
        return self.stats()

    def forward(self, batch: StepBatch):
        """Hidden states on to the next shard, or (last shard) sampled token ids."""
        t0 = time.time()
        self.free(batch.free)
        if self.device == "cpu":
            want = self.all_cores if batch.alone else self.threads
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
        out = self.stage(batch)
        # hidden states and logits leave the device: the next hop may be another node or GPU
        if self.stage.is_last:
            out = sample(out.cpu(), batch.sampling, batch.steps).tolist()
        else:
            out = batch.with_hidden(out.cpu())
        self.busy.append((t0, time.time()))
        self.steps += 1
        return out

    def free(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.stage.free(sid)

    def grow(self, layers: LayerRange, handoff: dict) -> dict:
        """handoff: the giving shard's shrink() result (K/V of live sequences, dropped layers)."""
        self.stage.grow(self.source, layers, handoff["kv"], handoff["dropped"])
        return self.stats()

    def shrink(self, layers: LayerRange) -> dict:
        kv = self.stage.shrink(layers)
        _release_freed_memory()
        return kv

    def stats(self) -> dict:
        """Measured numbers: RSS, weight and KV bytes, step timings."""
        times = [e - s for s, e in self.busy]
        return {
            "start": self.stage.layers.start, "end": self.stage.layers.end,
            "device": self.device, "compression": self.spec.compression, "pid": os.getpid(),
            "node": _node_ip(), "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": peak_rss(), "base_rss_bytes": self.base_rss,
            "weight_bytes": self.stage.weight_bytes(), "kv_bytes_used": self.stage.kv.bytes_used(),
            "kv_bytes_reserved": self.stage.kv.bytes_reserved(),
            "kv_blocks_used": self.stage.kv.table.used_blocks, "live_sequences": len(self.stage.kv.table.lengths),
            "budget_bytes": self.spec.budget_bytes, "steps": self.steps,
            "step_ms_mean": 1000 * sum(times) / len(times) if times else 0.0,
            "busy": list(self.busy),
        }


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM; falls back to current RSS off Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return psutil.Process().memory_info().rss


def stop_shards(handles: list) -> None:
    import ray
    for h in handles:
        ray.kill(h)


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages (its mmap threshold rises past 14 MiB weight tensors once
    one is freed), so dropped layers would not lower RSS; malloc_trim hands them back."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _node_ip() -> str | None:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:
        return None


def start_shards(model: str, specs: list[ShardSpec], kv_blocks: int, block_size: int = 16,
                 prefix: str = "", max_restarts: int = 0) -> list:
    """One named Ray actor per spec; each gets its share of this node's cores or one GPU."""
    import ray
    threads = max(1, (os.cpu_count() or 1) // len(specs))
    handles = []
    for spec in specs:
        gpu = spec.device.startswith("cuda")
        cls = ray.remote(ShardWorker).options(
            name=f"{prefix}shard-{spec.index}", namespace=NAMESPACE, num_gpus=1 if gpu else 0,
            # threads, not Ray's CPU slots, share the cores: 0 logical CPUs keeps small machines
            # from deadlocking Serve's own actors
            num_cpus=0, max_restarts=max_restarts,
            max_concurrency=1, get_if_exists=True,   # the CLI starts them; Serve attaches
            # detached: a Serve replica that restarts (or a request cancelled mid-build) must not
            # take the loaded shards with it; whoever ends the service kills them (stop_shards)
            lifetime="detached")
        handles.append(cls.remote(model, spec, kv_blocks, block_size, threads))
    return handles
