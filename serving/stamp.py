"""What a measurement ran on: every bench result (bench/results/*.json) carries this record, and
docs/benchmarks.md stamps its tables with the same fields."""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

from shards.runtime.probe import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp() -> dict:
    """{commit, date, cpu, cores, torch, ray}: the metadata of one measurement."""
    import ray
    import torch
    return {"commit": _commit(), "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "ray": ray.__version__}
