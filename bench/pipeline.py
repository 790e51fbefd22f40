"""Throughput of the pipelined engine (in-process router, shard actors on a local Ray) against
transformers' generate in one process, same prompts, same run.

    .venv/bin/python bench/pipeline.py --shards 2 --concurrency 1 8 32 --json bench/pipeline.json

Prompts: ../shared/data/prompts-500.jsonl (chat template), max_tokens 64, temperature 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path


def load_prompts(tok, n: int) -> list[list[int]]:
    from shards.data import read_prompts
    from shards.source import chat_prompt_ids
    rows = read_prompts(n)
    return [chat_prompt_ids(tok, [{"role": "user", "content": r}]) for r in rows]


async def engine_run(engine, prompts, conc: int, max_tokens: int) -> dict:
    from shards.step import SamplingParams
    params = SamplingParams(max_tokens=max_tokens)
    sem = asyncio.Semaphore(conc)
    lat, ttft, toks = [], [], 0

    async def one(ids):
        nonlocal toks
        async with sem:
            t0 = time.perf_counter()
            first = None
            async for d in engine.generate(ids, params):
                first = first or time.perf_counter()
                toks += len(d.token_ids)
            lat.append(time.perf_counter() - t0)
            ttft.append(first - t0)
    t = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t
    lat.sort()
    ttft.sort()
    return {"concurrency": conc, "requests": len(prompts), "completion_tokens": toks,
            "tokens_per_s": toks / wall, "p50_s": lat[len(lat) // 2], "p99_s": lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0],
            "ttft_p50_s": ttft[len(ttft) // 2]}


def hf_run(model, tok, prompts, batch: int, max_tokens: int) -> dict:
    import torch
    tok.padding_side = "left"
    toks, t = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
        gen = out[:, width:]
        toks += int(sum(((g != 2).cumprod(0)).sum().item() + (1 if (g == 2).any() else 0) for g in gen))
    wall = time.perf_counter() - t
    return {"batch": batch, "requests": len(prompts), "completion_tokens": toks, "tokens_per_s": toks / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=0, help="per level; default 2 x concurrency (min 4)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    import ray

    from serving.launch import EngineConfig, build_engine
    from shards.source import open_source
    src = open_source("default")
    tok = src.tokenizer()
    ray.init(namespace="shardserve", include_dashboard=False, log_to_driver=False)
    result = {"shards": a.shards, "engine": [], "hf_generate": []}

    async def run_engine():
        engine = await build_engine(EngineConfig(shards=a.shards, prefix="bench-"))
        for c in a.concurrency:
            prompts = load_prompts(tok, a.requests or max(4, 2 * c))
            r = await engine_run(engine, prompts, c, a.max_tokens)
            print("engine", r, flush=True)
            result["engine"].append(r)
        engine.close()
        for h in engine.shards:
            ray.kill(h)
    asyncio.run(run_engine())
    ray.shutdown()
    if not a.no_hf:
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name, dtype=torch.float32).eval()
        for c in a.concurrency:
            r = hf_run(model, tok, load_prompts(tok, a.requests or max(4, 2 * c)), c, a.max_tokens)
            print("hf", r, flush=True)
            result["hf_generate"].append(r)
        for e, h in zip(result["engine"], result["hf_generate"]):
            e["ratio_vs_hf"] = e["tokens_per_s"] / h["tokens_per_s"]
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
