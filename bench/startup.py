"""Start-up: seconds from `shardserve serve --shards 2 --ask Q` to its printed answer, with empty
caches (cold: inductor's decode graphs, our C++ kernels and the machine probe are all built) and
again on the caches the cold run left (warm); the caches' size on disk. The OS page cache is
left as it is: the default model's 140 MB GGUF is read in well under a second either way.

    .venv/bin/python bench/startup.py --json bench/results/startup.json [--rounds 2]

Each round uses a new cache folder under a temporary directory, removed after.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.stamp import stamp

QUESTION = "What is the capital of France?"


def timed_ask(cache: Path, model: str) -> dict:
    """One `serve --ask` with its caches in `cache`: seconds to the answer and to exit."""
    env = {**os.environ, "SHARDSERVE_CACHE": str(cache),
           "SHARDSERVE_COMPILE_CACHE": str(cache / "inductor"), "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("SHARDSERVE_KERNEL_CACHE", None)
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--shards", "2", "--model", model, "--ask", QUESTION]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    answer, answered, ready = None, None, False
    try:
        for line in proc.stdout:
            # the reply is the first line after the CLI's "OpenAI API at" line (Ray's own
            # messages, coloured, may come later on the same stream)
            if ready and answer is None and line.strip():
                answer, answered = line.strip(), time.perf_counter() - t0
            ready = ready or line.startswith("shardserve:")
        rc = proc.wait(600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"answer_s": answered, "exit_s": time.perf_counter() - t0, "rc": rc, "answer": answer}


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    runs = []
    for rnd in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="shardserve-startup-") as tmp:
            cache = Path(tmp) / "cache"
            for kind in ("cold", "warm"):
                r = {"round": rnd, "kind": kind, **timed_ask(cache, args.model), "cache_mb": size_mb(cache)}
                runs.append(r)
                print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": stamp(), "model": args.model, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
