"""Peak RSS per shard actor against the plan, for 1/2/3 shards and several compressions:

    .venv/bin/python bench/memory.py --shards 1 2 3 --compression fp32 w8a16 nf4 \
        --json bench/results/shard-memory-vs-plan.json --plot bench/results/shard-memory-vs-plan.png

Each configuration starts its shard actors on a local Ray, runs 16 concurrent chat requests
(prompts-500, 32 new tokens) through the router so KV pools and activations are touched, then
reads every actor's peak RSS (VmHWM), its RSS before loading anything (the runtime: Python,
torch, Ray's worker) and the plan's estimate (weights + KV pool + workspace,
docs/design.md, "Memory model"). The plan budgets the shard's tensors, not the runtime, so the comparison is
(peak - runtime) against the plan.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from serving.stamp import stamp


async def one_config(shards: int, compression: str, kv_tokens: int) -> list[dict]:
    from serving.config import load
    from serving.launch import build_engine
    from shards.data import read_prompts
    from shards.model.source import chat_prompt_ids
    from shards.model.step import SamplingParams
    from shards.plan.planner import WORKSPACE_BYTES
    engine = await build_engine(load(shards=shards, compression=compression, kv_tokens=kv_tokens, compile=False,
                                      prefix=f"mem{shards}-{compression}-"))
    try:
        ids = [chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": p}]) for p in read_prompts(16)]
        await asyncio.gather(*(engine.complete(i, SamplingParams(max_tokens=32)) for i in ids))
        stats = await engine.stats()
    finally:
        from shards.runtime.actor import stop_pipeline
        engine.close()
        stop_pipeline(engine.pipeline.shards.prefix)
    rows = []
    for spec, st in zip(engine.plan.shards, stats):
        plan_bytes = spec.weight_bytes + spec.kv_bytes + WORKSPACE_BYTES
        rows.append({"shards": shards, "compression": compression, "index": spec.index,
                     "layers": str(spec.layers), "plan_bytes": plan_bytes, "plan_weight_bytes": spec.weight_bytes,
                     "plan_kv_bytes": spec.kv_bytes, "weight_bytes": st.weight_bytes,
                     "peak_rss_bytes": st.peak_rss_bytes, "base_rss_bytes": st.base_rss_bytes,
                     "rss_bytes": st.rss_bytes,
                     "peak_minus_runtime_over_plan": (st.peak_rss_bytes - st.base_rss_bytes) / plan_bytes})
    return rows


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    out = ["| shards | compression | shard | layers | plan MiB (weights + KV + workspace) | weights MiB (built) | "
           "runtime MiB | peak RSS MiB | (peak - runtime) / plan |", "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['shards']} | {r['compression']} | {r['index']} | {r['layers']} | {mib(r['plan_bytes'])} "
                   f"({mib(r['plan_weight_bytes'])} + {mib(r['plan_kv_bytes'])} + 64) | {mib(r['weight_bytes'])} | "
                   f"{mib(r['base_rss_bytes'])} | {mib(r['peak_rss_bytes'])} | {r['peak_minus_runtime_over_plan']:.2f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    comps = list(dict.fromkeys(r["compression"] for r in rows))
    fig, axes = plt.subplots(1, len(comps), figsize=(4 * len(comps), 4), sharey=True, squeeze=False)
    for ax, comp in zip(axes[0], comps):
        sel = [r for r in rows if r["compression"] == comp]
        labels = [f"{r['shards']}:{r['index']}" for r in sel]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r["peak_rss_bytes"] / 2**20 for r in sel], 0.4, label="peak RSS")
        ax.bar([i + 0.2 for i in x], [(r["plan_bytes"] + r["base_rss_bytes"]) / 2**20 for r in sel], 0.4,
               label="plan + runtime")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("shards:shard")
        ax.set_title(comp)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("MiB per shard actor")
    axes[0][0].legend()
    fig.suptitle("SmolLM2-135M: memory per shard vs number of shards and compression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--compression", nargs="+", default=["fp32", "w8a16", "nf4"])
    ap.add_argument("--kv-tokens", type=int, default=4096)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    import ray
    ray.init(namespace="shardserve", include_dashboard=False, log_to_driver=False)
    rows = []
    for comp in args.compression:
        for n in args.shards:
            rows += asyncio.run(one_config(n, comp, args.kv_tokens))
            print(json.dumps(rows[-n:]), flush=True)
    ray.shutdown()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": stamp(), "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
