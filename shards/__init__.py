"""shardserve's model side: layer ranges, model sources, stages, compression, planning, shard actors.

Kept light: importing `shards` pulls in neither torch-heavy modules, bitsandbytes nor ray;
those load where they are used.
"""
import os
from pathlib import Path

# where the compiled decode graphs persist (shards/model/compiled.py). Set before torch is imported:
# inductor fixes its cache directory on first use, and loading a model already uses it.
# TORCHINDUCTOR_CACHE_DIR, when set, wins.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.environ.get(
    "SHARDSERVE_COMPILE_CACHE", str(Path.home() / ".cache" / "shardserve" / "inductor")))
# MKL's strict reproducible mode: its fp32 GEMM gives a row the same bits at any row count and
# thread count. By default, at 2 threads a [rows, 1536] x [1536, 576] GEMM (down_proj) splits
# differently for 57-192 rows, so a prompt's prefill changed with what it was batched with and
# whether its step ran alone, and that flipped near-tie greedy answers under load (docs/design.md,
# "Batch-invariant numbers"). Measured cost: none past the noise. MKL reads it at its first call.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from shards.errors import KVCacheFull, ModelSourceError, PlanError, RangeError, ShardServeError  # noqa: E402
from shards.plan.layer_range import LayerRange, split_even  # noqa: E402

__all__ = [
    "LayerRange", "split_even", "ShardServeError", "RangeError", "ModelSourceError",
    "PlanError", "KVCacheFull",
]
