"""Measures what a shard process holds before its weights (shards/plan/footprint.py, Overheads):
the runtime a shard actor imports, and inductor's runtime once a graph is compiled and loaded.

The probe runs in a fresh process as a shard would: a Ray actor when this process is connected
to Ray (its worker's own threads and buffers counted: ~20 MiB more), else a subprocess, whose
numbers serve only until a Ray worker's have been measured on this machine. The numbers depend
on the machine and the installation, not the model: they are cached for ten minutes per Python
environment, its torch, transformers, Ray and bitsandbytes versions and the CPU model under the
cache directory.

    python -m shards.runtime.probe [--compile] [--bitsandbytes]     # prints the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from shards.plan.footprint import COMPILED_LAYER_BYTES, Overheads

CACHE_S = 600.0   # how long a measurement serves later plans (_fresh)


def _measure(compile_: bool, bitsandbytes: bool) -> dict:
    """In the probing process: private RSS after the shard's imports, then after compiling and
    running one small graph (inductor, its C++ wrapper and the loaded kernel)."""
    import ray  # noqa: F401  (a shard is a Ray worker)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (what a Stage imports)

    from shards.runtime.actor import ShardWorker, private_rss  # noqa: F401  (the actor's own imports)
    if bitsandbytes:
        import bitsandbytes  # noqa: F401
    _touch_step_kernels(torch)
    runtime = private_rss()
    compiled = 0
    if compile_:
        f = torch.compile(lambda x, w: torch.nn.functional.silu(x @ w) * x, dynamic=False)
        with torch.inference_mode():
            f(torch.randn(4, 64), torch.randn(64, 64))
        compiled = private_rss() - runtime
    return {"runtime_bytes": runtime, "compiled_bytes": compiled}


def _touch_step_kernels(torch) -> None:
    """Run, once and small, the ops a shard's steps run: the library code they execute is
    mapped into the process (20-30 MiB of RSS a shard gains over its first steps)."""
    import torch.nn.functional as F
    with torch.inference_mode():
        x, w = torch.randn(2, 8, 64), torch.randn(64, 64)
        q = torch.randn(2, 4, 8, 16)
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(8, 8))
        h = F.silu(F.linear(F.rms_norm(x, (64,)), w)) * x
        torch.embedding(w, torch.tensor([1, 2]))
        h.softmax(-1).topk(4, dim=-1)
        torch.searchsorted(h[0, 0].sort().values, torch.rand(3))
        qw = torch.randint(-127, 127, (64, 64), dtype=torch.int8)
        torch._weight_int8pack_mm(x[0].bfloat16(), qw, torch.ones(64, dtype=torch.bfloat16))


class _Probe:
    def measure(self, compile_: bool, bitsandbytes: bool) -> dict:
        return _measure(compile_, bitsandbytes)


def _in_ray(compile_: bool, bitsandbytes: bool) -> dict:
    import ray
    probe = ray.remote(_Probe).options(num_cpus=0, max_restarts=0).remote()
    try:
        return ray.get(probe.measure.remote(compile_, bitsandbytes), timeout=300)
    finally:
        ray.kill(probe)


def _in_subprocess(compile_: bool, bitsandbytes: bool) -> dict:
    cmd = [sys.executable, "-m", "shards.runtime.probe"] + ["--compile"] * compile_ + ["--bitsandbytes"] * bitsandbytes
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _key(compile_: bool, bitsandbytes: bool, ray_worker: bool) -> str:
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"
    # the installation too: a fresh one's libraries sit whole in the page cache, and the pages a
    # process maps of them count in its RSS (measured: 436 MiB against 370 for the same versions)
    parts = [sys.prefix, platform.python_version(), cpu_model()] + \
        [v(p) for p in ("torch", "transformers", "ray", "bitsandbytes")]
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
    return f"overheads-v1-{digest}-c{int(compile_)}-b{int(bitsandbytes)}-{'ray' if ray_worker else 'proc'}.json"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def _fresh(path) -> bool:
    """A measurement younger than CACHE_S: the library pages a process maps depend on what the
    page cache holds, which changes over minutes (a shard's runtime measured 392 MiB where a
    probe of the same installation an hour earlier measured 481)."""
    import time
    return path.is_file() and time.time() - path.stat().st_mtime < CACHE_S


def measure_overheads(compile_: bool, bitsandbytes: bool, max_batch: int, prefill_tokens: int) -> Overheads:
    """This machine's Overheads for a shard that compiles (or not) and imports bitsandbytes (or
    not), its workspace sized for `max_batch` and `prefill_tokens`; measured once, then cached."""
    from shards.model.source import cache_dir
    try:
        import ray
        ray_worker = ray.is_initialized()
    except ImportError:
        ray_worker = False
    path = cache_dir() / _key(compile_, bitsandbytes, ray_worker)
    as_worker = cache_dir() / _key(compile_, bitsandbytes, True)
    if not ray_worker and _fresh(as_worker):
        path = as_worker    # a Ray worker's numbers from a recent start: what the shards will hold
    if _fresh(path):
        d = json.loads(path.read_text())
    else:
        d = (_in_ray if ray_worker else _in_subprocess)(compile_, bitsandbytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(d))
        tmp.replace(path)
    return Overheads(runtime_bytes=d["runtime_bytes"], compiled_bytes=d["compiled_bytes"],
                     compiled_layer_bytes=COMPILED_LAYER_BYTES if compile_ else 0,
                     max_batch=max_batch, prefill_tokens=prefill_tokens)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--bitsandbytes", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(_measure(a.compile, a.bitsandbytes)))


if __name__ == "__main__":
    main()
