"""A shard's Prometheus series, through Ray's metrics (ray.util.metrics): exported by its node's
Ray metrics agent as `ray_shardserve_...`, gathered by the app's `/metrics` route. Tagged with
the shard's actor name, which a split or a restart keeps."""
from __future__ import annotations

STEP_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


class ShardMetrics:
    def __init__(self, shard: str):
        from ray.util.metrics import Gauge, Histogram
        self.step = Histogram("shardserve_shard_step_seconds", "one step's compute in a shard (decode or prefill)",
                              boundaries=STEP_S, tag_keys=("shard", "kind"))
        self.kv_used = Gauge("shardserve_kv_blocks_used", "KV blocks held by sequences and prefix holders",
                             tag_keys=("shard",))
        self.kv_total = Gauge("shardserve_kv_blocks_total", "KV blocks of the shard's pool", tag_keys=("shard",))
        for m in (self.step, self.kv_used, self.kv_total):
            m.set_default_tags({"shard": shard})

    def stepped(self, seconds: float, decode: bool, used_blocks: int, total_blocks: int) -> None:
        self.step.observe(seconds, tags={"kind": "decode" if decode else "prefill"})
        self.kv_used.set(used_blocks)
        self.kv_total.set(total_blocks)
