"""Decode steps on every core when no other group overlaps, or on the shard's share: an A/B of
`shards/runtime/cores.py::decodes_alone` over HTTP (docs/benchmarks.md, "decode-threads").

    .venv/bin/python bench/decode_threads.py --json bench/results/decode-threads-NAME.json [--model GGUF]

Variant A: the shard's share, the 4-bit kernel alone (SHARDSERVE_ALONE_DECODE_BYTES huge,
SHARDSERVE_KERNEL_TEAM=0); B: every core through torch's threads (bytes 0); T: the share, with
the kernel's panels split over every core (qmatmul.team, any shard); S: T with every process's OpenMP
threads sleeping as soon as a region ends (GOMP_SPINCOUNT=0). `--order` names the servers started,
in turn (default A B B A), 2 shards each; each runs c=1, 8 and 32 on serving prompts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os

from serving.bench import http_level, serving
from serving.stamp import stamp
from shards.data import read_prompts

VARIANTS = {"A": {"SHARDSERVE_ALONE_DECODE_BYTES": str(1 << 62), "SHARDSERVE_KERNEL_TEAM": "0"},
            "B": {"SHARDSERVE_ALONE_DECODE_BYTES": "0", "SHARDSERVE_KERNEL_TEAM": "0"},
            "T": {"SHARDSERVE_KERNEL_TEAM": "1"},
            "S": {"SHARDSERVE_KERNEL_TEAM": "1", "GOMP_SPINCOUNT": "0"}}
LEVELS = ((1, 4), (8, 16), (32, 32))       # (concurrency, requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--port", type=int, default=8125)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--order", default="ABBA", help="variants, one server each, in this order")
    args = ap.parse_args()
    runs = []
    for rnd, name in enumerate(args.order):
        for key in {k for v in VARIANTS.values() for k in v}:
            os.environ.pop(key, None)
        os.environ.update(VARIANTS[name])
        with serving(args.port, "--shards", "2", "--model", args.model) as url:
            for c, n in LEVELS:
                r = asyncio.run(http_level(url, read_prompts(n, start=100 * rnd), c, 64))
                runs.append({"variant": name, "round": rnd, "c": c, "tok_s": r["tokens_per_s"], "itl_ms": r["itl_p50_ms"]})
                print(json.dumps(runs[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": stamp(), "model": args.model, "levels": LEVELS, "order": args.order, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
