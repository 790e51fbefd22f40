"""CPU time a generated token costs in each process of a serving node, at one concurrency:

    .venv/bin/python bench/cpu_split.py [--model M] [--concurrency 1] --json bench/results/cpu-split-NAME.json

Starts `serve --shards 2`, warms it with two requests, then sums each process's user + system
seconds (psutil) over `--requests` streamed requests of 64 tokens and divides by the tokens
generated. On a 2-core node every process competes for the cores the shards step on, so work off
the critical path (the router's detokenizing and SSE, Serve's proxy, control loops) still slows
the steps it runs beside.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import psutil

from serving.bench import http_level, serving
from serving.stamp import stamp
from shards.data import read_prompts


def label(cmdline: list[str], name: str) -> str:
    """A process's short name: Ray's process title (ray::ShardWorker), else its program, or for
    Python the script or module it runs."""
    if not cmdline:
        return name
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    args = [a for a in cmdline[1:] if not a.startswith("-") or a == "-m"]
    if "python" in os.path.basename(cmdline[0]) and args:
        return "python " + (" ".join(args[:2]) if args[0] == "-m" else os.path.basename(args[0]))
    return os.path.basename(cmdline[0])


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """pid -> (user + system CPU seconds, label)."""
    out = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, label(p.info["cmdline"] or [], p.info["name"]))
        except psutil.Error:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--port", type=int, default=8127)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with serving(args.port, "--shards", "2", "--model", args.model) as url:
        asyncio.run(http_level(url, read_prompts(2, start=300), 1, 16))
        before, t0 = cpu_seconds(), time.time()
        level = asyncio.run(http_level(url, read_prompts(args.requests), args.concurrency, 64))
        after, wall = cpu_seconds(), time.time() - t0
    tokens = level["completion_tokens"]
    rows = sorted(({"process": after[p][1], "ms_per_token": (after[p][0] - before[p][0]) / tokens * 1e3}
                   for p in after if p in before), key=lambda r: -r["ms_per_token"])
    rows = [r for r in rows if r["ms_per_token"] >= 0.05]
    result = {"meta": stamp(), "model": args.model, "concurrency": args.concurrency, "tokens": tokens,
              "wall_s": wall, "tokens_per_s": level["tokens_per_s"], "processes": rows}
    for r in rows:
        print(f"{r['ms_per_token']:7.2f} ms/token  {r['process']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
