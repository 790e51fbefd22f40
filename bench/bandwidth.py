"""This machine's memory bandwidth, STREAM's triad (a = b + s * c) on arrays far larger than the
caches, with torch's threads at 1 and at every core:

    .venv/bin/python bench/bandwidth.py [--mib 512] [--repeat 10] [--json bench/results/bandwidth.json]

Bytes moved per triad are counted as STREAM counts them (read b and c, write a: 3 arrays), best
of `repeat` runs. Decode at batch 1 reads every weight once per token, so weight bytes / this
bandwidth is the fastest a token can be made (docs/scale.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from serving.stamp import stamp


def triad_gib_s(mib: int, repeat: int, threads: int) -> float:
    import torch
    torch.set_num_threads(threads)
    n = mib * (1 << 20) // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    torch.add(b, c, alpha=3.0, out=a)            # first touch of a's pages
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    return 3 * a.nbytes / best / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="MiB per array (three arrays)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    result = {"meta": stamp(), "mib_per_array": a.mib,
              "triad_gib_s": {str(t): round(triad_gib_s(a.mib, a.repeat, t), 2) for t in sorted({1, cores})}}
    print(json.dumps(result["triad_gib_s"]))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
