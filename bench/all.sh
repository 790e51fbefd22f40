#!/usr/bin/env bash
# Regenerate every result under bench/results/ (docs/benchmarks.md; about 40 minutes on 2 cores).
# Run from the repository root after deploy/setup.sh; prints the markdown tables as it goes.
set -euo pipefail
PY=.venv/bin/python
$PY bench/compression.py --seqlen 512 --windows 8 --json bench/results/compression-quality-memory.json --plot bench/results/compression-quality-memory.png
$PY bench/plan_memory.py --model default --json bench/results/plan-vs-rss-smollm2-135m.json
for c in fp32 w4a8x2; do
  .venv/bin/shardserve bench --shards 2 --compression "$c" --json "bench/results/http-serving-$c.json" --plot "bench/results/http-serving-$c.png"
done
