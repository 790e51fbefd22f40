"""What constrained requests cost the unconstrained ones beside them (docs/benchmarks.md).

    .venv/bin/python bench/structured.py --json bench/results/structured-output.json

The default model, 2 shards at the default spec, served by the app on a local Ray. Each round
runs 16 concurrent streamed chat requests (64 new tokens) twice, in alternating order: all 16
unconstrained ("plain"), and 8 unconstrained beside 8 under a strict JSON schema ("mixed").
The unconstrained ones are serving prompts whose greedy replies run past 64 tokens (screened
first) and the constrained ones write a string longer than that, so every request decodes to
the end and the batch keeps its size. The number compared is the unconstrained requests' inter-token
latency (p50 of each request's mean gap, then the median over rounds): the difference is what
the masks cost (filled in the router, carried in the step, applied in the last shard). Then
100 requests under a small person schema, sampled at temperature 0.8, are validated.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from serving.bench import serving
from serving.stamp import stamp
from shards.data import read_prompts

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24},
                                                       "maxItems": 3}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
# for the cost: a document longer than max_tokens, so a constrained request decodes as long as
# an unconstrained one and the batch keeps its size
LONG = {"type": "json_schema", "json_schema": {"name": "story", "strict": True, "schema": {
    "type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"], "additionalProperties": False}}}


async def one(client, url: str, prompt: str, fmt: dict | None, max_tokens: int, seed: int = 0) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0.8 if fmt is FORMAT else 0, "seed": seed}
    if fmt is not None:
        body["response_format"] = fmt
    stamps, text, finish = [], [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                finish = choice["finish_reason"] or finish
                if choice["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    text.append(choice["delta"]["content"])
    gap = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 2 else None
    return {"constrained": fmt is not None, "itl_s": gap, "tokens": len(stamps), "text": "".join(text),
            "finish": finish}


async def level(url: str, prompts: list[str], constrained: int, max_tokens: int) -> dict:
    """len(prompts) requests at once, the first `constrained` of them under LONG."""
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(one(client, url, p, LONG if i < constrained else None, max_tokens)
                                    for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    plain = [r["itl_s"] for r in rs if not r["constrained"] and r["itl_s"]]
    return {"constrained": constrained, "wall_s": wall, "plain_itl_ms_p50": 1000 * statistics.median(plain),
            "plain_tokens": sum(r["tokens"] for r in rs if not r["constrained"]),
            "constrained_tokens": sum(r["tokens"] for r in rs if r["constrained"])}


async def long_prompts(url: str, n: int, max_tokens: int) -> list[str]:
    """n serving prompts whose greedy replies run to max_tokens (no request of the comparison
    ends early, so the batch keeps its size; greedy replies do not depend on the batch)."""
    async with httpx.AsyncClient(timeout=600) as client:
        candidates = read_prompts(8 * n)
        rs = await asyncio.gather(*(one(client, url, p, None, max_tokens) for p in candidates))
    long = [p for p, r in zip(candidates, rs) if r["finish"] == "length"]
    if len(long) < n:
        raise RuntimeError(f"only {len(long)} of {len(candidates)} prompts run to {max_tokens} tokens")
    return long[:n]


async def validity(url: str, prompts: list[str], concurrency: int) -> dict:
    """Every prompt under FORMAT, sampled at temperature 0.8 with its own seed: how many replies
    parse and validate against the schema."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def run(i, p):
            async with sem:
                return await one(client, url, p, FORMAT, 160, seed=i)
        rs = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
    return {"requests": len(rs), "valid": sum(_valid(r["text"]) for r in rs),
            "finished_stop": sum(r["finish"] == "stop" for r in rs),
            "invalid": [(r["finish"], r["text"]) for r in rs if not _valid(r["text"])],
            "examples": [r["text"] for r in rs[:3]]}


def _valid(text: str) -> bool:
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--valid", type=int, default=100, help="requests whose JSON is validated")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with serving(args.port, "--shards", "2") as url:
        prompts = asyncio.run(long_prompts(url, args.concurrency, args.max_tokens))
        runs = []
        for r in range(args.rounds):
            order = (0, args.concurrency // 2) if r % 2 == 0 else (args.concurrency // 2, 0)
            for constrained in order:
                runs.append({"round": r, **asyncio.run(level(url, prompts, constrained, args.max_tokens))})
                print(json.dumps(runs[-1]), flush=True)
        checked = asyncio.run(validity(url, read_prompts(args.valid, start=200), args.concurrency))
        print(json.dumps(checked), flush=True)
    plain = statistics.median(x["plain_itl_ms_p50"] for x in runs if x["constrained"] == 0)
    mixed = statistics.median(x["plain_itl_ms_p50"] for x in runs if x["constrained"])
    out = {"meta": stamp(), "concurrency": args.concurrency, "max_tokens": args.max_tokens, "runs": runs,
           "plain_itl_ms": plain, "mixed_itl_ms": mixed, "slowdown": mixed / plain - 1, "validity": checked}
    print(json.dumps({k: v for k, v in out.items() if k not in ("runs", "meta")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
