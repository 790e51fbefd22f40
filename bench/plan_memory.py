"""The plan's footprint of every shard against the process it predicts:

    .venv/bin/python bench/plan_memory.py --model DIR --shards 2 \
        --compression fp32 bf16 w8a16 fast nf4 --json bench/results/plan-vs-rss-NAME.json

For each compression the plan is made as `shardserve serve` makes it (its runtime and
inductor's measured by shards/runtime/probe.py in a Ray worker), then each shard is started
alone as a Ray actor, so a pipeline larger than this machine (8B at fp32) is measured a shard
at a time. Per shard:
- at rest: private RSS once loaded (step heap trimmed), against runtime + weights + KV + compiled;
- load peak: VmHWM once loaded, against at rest + one fp32 layer;
- serving peak: the peak is reset, then the largest steps the scheduler sends run (a prefill of
  `max_batch` sequences of `prefill_tokens / max_batch` tokens, a single prefill chunk of
  `prefill_tokens`, a decode step of `max_batch` sequences); VmHWM against the plan's total;
- seconds from the actor's start to loaded, of them loading its layers, of them compiling; GiB
  of source tensors read, converted and quantized per second of loading (compiling excluded).
Each row prints as JSON as it is measured; bench/tables.py renders the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from serving.stamp import stamp

MiB = 1 << 20


def _steps(spec, hidden: int, batch: int, chunk: int) -> list:
    """The scheduler's largest steps for this shard: tokens for the first, hidden states after."""
    import torch

    from shards.model.step import SamplingParams, StepBatch

    def step(ids, starts, q):
        n, kw = len(ids), {"sampling": [SamplingParams()] * len(ids), "steps": [0] * len(ids)}
        if spec.layers.start == 0:
            return StepBatch(ids, starts, [q] * n, tokens=torch.randint(0, 1000, (n, q)), **kw)
        return StepBatch(ids, starts, [q] * n, hidden=torch.randn(n, q, hidden).numpy(), layer=spec.layers.start, **kw)
    short = max(1, chunk // batch)
    return [step([0], [0], chunk), step(list(range(1, batch + 1)), [0] * batch, short),
            step(list(range(1, batch + 1)), [short] * batch, 1)]


def source_bytes(model: str, spec, n_layers: int) -> int:
    """Bytes of the source tensors a shard reads (safetensors folders; 0 for other sources)."""
    from safetensors import safe_open

    files = sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    total = 0
    for f in files:
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                if _reads(name, spec, n_layers):
                    sl = h.get_slice(name)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * {"BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 4)
    return total


def _reads(name: str, spec, n_layers: int) -> bool:
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) in range(spec.layers.start, spec.layers.end)
    first, last = spec.layers.start == 0, spec.layers.end == n_layers
    return (first and "embed_tokens" in name) or (last and ("lm_head" in name or name == "model.norm.weight"))


def one_shard(model: str, spec, cfg, hidden: int, n_layers: int) -> dict:
    import ray

    from shards.runtime.actor import start_shard
    t0 = time.time()
    h = start_shard(model, spec, spec.kv_tokens // cfg.cache.block_size, cfg.cache.block_size,
                    f"planbench-shard-{spec.index}", 2)
    try:
        loaded = ray.get(h.ready.remote(), timeout=3600)
        load_s = time.time() - t0
        ray.get(h.reset_peak.remote())
        steps = _steps(spec, hidden, cfg.scheduler.max_batch, cfg.scheduler.prefill_tokens)
        for st in steps:
            ray.get(h.forward.remote(st), timeout=600)
        ray.get(h.free.remote([i for st in steps[:2] for i in st.seq_ids]))
        served = ray.get(h.stats.remote())
    finally:
        ray.kill(h)
    f = spec.footprint
    src = source_bytes(model, spec, n_layers)
    return {"index": spec.index, "layers": str(spec.layers), "compression": spec.compression,
            "plan": {"weights": f.weights, "kv": f.kv, "runtime": f.runtime, "compiled": f.compiled,
                     "workspace": f.workspace, "transient": f.transient, "at_rest": f.at_rest,
                     "total": f.total, "load_peak": f.load_peak},
            "measured": {"runtime": loaded.base_rss_bytes, "weights": loaded.weight_bytes,
                         "kv": loaded.kv_bytes_reserved, "at_rest": loaded.rss_bytes,
                         "load_peak": loaded.peak_rss_bytes, "serving_peak": served.peak_rss_bytes},
            "start_s": round(load_s, 1), "load_s": loaded.load_s, "compile_s": loaded.compile_s, "source_bytes": src,
            # what reading, converting and quantizing take: the load less compiling
            "source_gib_per_s": round(src / 2**30 / (loaded.load_s - loaded.compile_s), 3) if src else None}


def run(model: str, shards: int, specs: list[str]) -> list[dict]:
    from serving.config import load
    from serving.launch import make_plan
    from shards.model.source import open_source
    config = open_source(model).config
    rows = []
    for comp in specs:
        cfg = load(model=model, shards=shards, compression=comp, placement=False)
        for spec in make_plan(cfg).shards:
            row = one_shard(model, spec, cfg, config.hidden_size, config.num_hidden_layers)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--compression", nargs="+", default=["fp32", "bf16", "w8a16", "fast", "nf4"])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import ray
    ray.init(logging_level="ERROR", log_to_driver=False)
    try:
        rows = run(a.model, a.shards, a.compression)
    finally:
        ray.shutdown()
    if a.json:
        a.json.write_text(json.dumps({"meta": stamp(), "model": a.model, "shards": a.shards, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
