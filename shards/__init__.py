"""shardserve's model side: layer ranges, model sources, stages, compression, planning, shard actors.

Kept light: importing `shards` pulls in neither torch-heavy modules, bitsandbytes nor ray;
those load where they are used.
"""
from shards.errors import KVCacheFull, ModelSourceError, PlanError, RangeError, ShardServeError
from shards.layer_range import LayerRange, split_even

__all__ = [
    "LayerRange", "split_even", "ShardServeError", "RangeError", "ModelSourceError",
    "PlanError", "KVCacheFull",
]
