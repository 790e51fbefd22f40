#!/usr/bin/env bash
# Regenerate every measured table and plot in the README (about 40 minutes on 2 cores).
# Run from the repository root after deploy/setup.sh; prints the markdown tables as it goes.
set -euo pipefail
PY=.venv/bin/python
$PY bench/compression.py --seqlen 512 --windows 8 --json bench/compression.json --plot bench/compression.png
$PY bench/memory.py --shards 1 2 3 --compression fp32 int8-cpu nf4 --json bench/memory.json --plot bench/memory.png
for c in fp32 fast; do
  .venv/bin/shardserve bench --shards 2 --compression "$c" --json "bench/http-$c.json" --plot "bench/http-$c.png"
done
