"""The controller under load, scripted: RSS of every shard actor over time, actions marked.

    .venv/bin/python bench/controller.py --json bench/controller.json --plot bench/controller.png
    .venv/bin/python bench/controller.py --model DIR --compression fast --concurrency 8 --json ...

A 2-shard pipeline (the default model at fp32, eager, unless told otherwise) on a local Ray
serves a steady load (concurrency 16, prompts-500 through the chat template, 64 new tokens,
greedy) while the script applies pressure through the same path as `PATCH /v1/shards/{k}`:
  1. shard 0's budget goes to 80% of its use (`--squeeze`)       -> the controller moves layers to shard 1;
  2. shard 1's budget to 80% of its use, with shard 0 left no room -> a split onto a new actor;
  3. `ray.kill` of shard 1                          -> the router re-places it, sequences recompute;
  4. the last shard's budget to 80% of its use (`--recompress-squeeze`), no room anywhere,
     max_shards reached                             -> its compression is raised a ladder step;
  5. every budget lifted                            -> after relax_s calm, back to the served spec.
Every request must complete (the script exits 1 otherwise).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from serving.stamp import stamp

CONTROL = {"readings": 3, "quiet_s": 8, "relax_s": 20, "max_shards": 3,
           "actions": ["move", "split", "recompress"]}


async def load(engine, prompts, stop: asyncio.Event, concurrency: int, results: list) -> None:
    from shards.model.step import SamplingParams

    async def worker(k):
        i = k
        while not stop.is_set():
            d = await engine.complete(prompts[i % len(prompts)], SamplingParams(max_tokens=64))
            results.append({"time": time.time(), "finish_reason": d.finish_reason, "tokens": d.completion_tokens})
            i += concurrency
    await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def sample(engine, t0: float, samples: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        stats = await engine.pipeline.reconfigure.stats_or_errors()
        for name, st in zip(engine.pipeline.shards.names, stats):
            if not isinstance(st, str):     # a line: it did not answer
                samples.append({"t": time.time() - t0, "name": name, "rss_bytes": st.rss_bytes,
                                "start": st.start, "end": st.end, "compression": st.compression,
                                "budget_bytes": st.budget_bytes})
        await asyncio.sleep(0.5)


async def used(engine, k: int) -> int:
    st = (await engine.stats())[k]
    return st.rss_bytes - st.base_rss_bytes


async def wait_event(engine, n: int, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while len(engine.pipeline.shards.events) <= n:
        if time.time() > deadline:
            raise TimeoutError(f"no controller action within {timeout} s")
        await asyncio.sleep(0.2)
    ev = engine.pipeline.shards.events[-1]
    print(f"  {ev['action']} shard {ev['shard']} ({ev['seconds']:.1f} s, {'ok' if ev['ok'] else ev['error']}): "
          f"{ev['reason']}", flush=True)
    return ev


async def scenario(engine, squeeze: float, recompress_squeeze: float) -> None:
    """squeeze: a squeezed shard's budget, as a fraction of its use; recompress_squeeze: the
    same for step 4, which the ladder's next step alone must meet."""
    import ray
    n = len(engine.pipeline.shards.events)
    await asyncio.sleep(10)
    print(f"1. shard 0 budget {squeeze:.0%} of use", flush=True)
    await engine.set_budget(0, int(squeeze * await used(engine, 0)))
    n += (await wait_event(engine, n)) is not None
    await asyncio.sleep(8)
    print(f"2. shard 1 budget {squeeze:.0%} of use; shard 0 has no room", flush=True)
    await engine.set_budget(0, int(await used(engine, 0) / 0.9))
    await engine.set_budget(1, int(squeeze * await used(engine, 1)))
    n += (await wait_event(engine, n)) is not None
    await asyncio.sleep(8)
    print("3. ray.kill shard-1", flush=True)
    ray.kill(engine.pipeline.shards.handles[1])
    n += (await wait_event(engine, n)) is not None
    await asyncio.sleep(8)
    last = len(engine.pipeline.shards.handles) - 1
    print(f"4. shard {last} budget {recompress_squeeze:.0%} of use; its neighbour has no room", flush=True)
    await engine.set_budget(last - 1, int(await used(engine, last - 1) / 0.9))
    await engine.set_budget(last, int(recompress_squeeze * await used(engine, last)))
    n += (await wait_event(engine, n)) is not None
    await asyncio.sleep(8)
    print("5. budgets lifted", flush=True)
    for k in range(len(engine.pipeline.shards.handles)):
        await engine.set_budget(k, None)
    await wait_event(engine, n)
    await asyncio.sleep(5)


async def main_async(args) -> dict:
    from serving.config import load as load_config
    from serving.launch import build_engine
    from shards.data import read_prompts
    from shards.model.source import chat_prompt_ids
    from shards.runtime.actor import stop_pipeline
    engine = await build_engine(load_config(model=args.model, shards=2, prefix="bench-", kv_tokens=4096,
                                     compile=args.compile, compression=args.compression, controller=CONTROL))
    try:
        prompts = [chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": p}]) for p in read_prompts(64)]
        stop, results, samples, t0 = asyncio.Event(), [], [], time.time()
        tasks = [asyncio.ensure_future(load(engine, prompts, stop, args.concurrency, results)),
                 asyncio.ensure_future(sample(engine, t0, samples, stop))]
        try:
            await scenario(engine, args.squeeze, args.recompress_squeeze or args.squeeze)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 300)
        events = [{**e, "t": e["time"] - t0} for e in engine.pipeline.shards.events]
        for e in events:   # the shards' RSS just before and just after, MiB by actor name
            e["rss_before"], e["rss_after"] = rss_at(samples, e["t"], before=True), \
                rss_at(samples, e["t"] + e.get("seconds", 0), before=False)
        return {"samples": samples, "events": events, "requests": len(results),
                "failed": sum(r["finish_reason"] not in ("stop", "length") for r in results),
                "tokens": sum(r["tokens"] for r in results), "seconds": time.time() - t0,
                "step_errors": list(engine.step_errors)}
    finally:
        engine.close()
        stop_pipeline("bench-")


def rss_at(samples: list[dict], t: float, before: bool, window: float = 5.0) -> dict[str, int]:
    """Each shard's RSS (MiB) in its last sample within `window` s before t, or its first within
    `window` s after t, by actor name."""
    out: dict[str, int] = {}
    for x in sorted(samples, key=lambda x: x["t"], reverse=before):
        near = t - window <= x["t"] <= t if before else t <= x["t"] <= t + window
        if near and x["name"] not in out:
            out[x["name"]] = round(x["rss_bytes"] / 2**20)
    return dict(sorted(out.items()))


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name in sorted({s["name"] for s in result["samples"]}):
        pts = [s for s in result["samples"] if s["name"] == name]
        ax.plot([p["t"] for p in pts], [p["rss_bytes"] / 2**20 for p in pts], label=name.removeprefix("bench-"))
    top = ax.get_ylim()[1]
    for e in result["events"]:   # shaded from the action's start to its end
        ax.axvspan(e["t"], e["t"] + max(e["seconds"], 0.3), color="grey", alpha=0.25)
        ax.text(e["t"], top, f" {e['action']} {e['name'].removeprefix('bench-')}", rotation=90, va="top", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("shard RSS (MiB)")
    ax.set_title(f"controller under load: {result['requests']} requests, {result['failed']} failed")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    import ray
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--compression", default="fp32")
    ap.add_argument("--compile", action="store_true", help="compiled decode steps (recompiled after each change)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--squeeze", type=float, default=0.8,
                    help="a squeezed shard's budget as a fraction of its use (above the least it can hold)")
    ap.add_argument("--recompress-squeeze", type=float, default=None,
                    help="step 4's fraction (default --squeeze): one ladder step must meet it, and "
                         "nf4 holds ~90%% of a w4a8x2 shard's bytes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    ray.init(namespace="shardserve", include_dashboard=False, log_to_driver=False)
    try:
        result = asyncio.run(main_async(args))
    finally:
        ray.shutdown()
    print(f"{result['requests']} requests ({result['tokens']} tokens) in {result['seconds']:.0f} s, "
          f"{result['failed']} failed; {len(result['step_errors'])} failed steps recomputed")
    for e in result["events"]:
        shape = " ".join(f"[{x['start']},{x['end']}){x['compression']}" for x in e["after"])
        print(f"  t={e['t']:5.1f}s {e['action']:10s} {e['name']:14s} {e['seconds']:4.1f}s -> {shape}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": stamp(), **result}, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
