"""shardserve's model side: layer ranges, model sources, stages, compression, planning, shard actors.

Kept light: importing `shards` pulls in neither torch-heavy modules, bitsandbytes nor ray;
those load where they are used.
"""
import os
from pathlib import Path

# where the compiled decode graphs persist (shards/compiled.py). Set before torch is imported:
# inductor fixes its cache directory on first use, and loading a model already uses it.
# TORCHINDUCTOR_CACHE_DIR, when set, wins.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.environ.get(
    "SHARDSERVE_COMPILE_CACHE", str(Path.home() / ".cache" / "shardserve" / "inductor")))

from shards.errors import KVCacheFull, ModelSourceError, PlanError, RangeError, ShardServeError  # noqa: E402
from shards.layer_range import LayerRange, split_even  # noqa: E402

__all__ = [
    "LayerRange", "split_even", "ShardServeError", "RangeError", "ModelSourceError",
    "PlanError", "KVCacheFull",
]
