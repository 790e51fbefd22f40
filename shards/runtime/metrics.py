"""A shard's Prometheus series, through Ray's metrics (ray.util.metrics): exported by its node's
Ray metrics agent as `ray_shardserve_...`, gathered by the app's `/metrics` route. Tagged with
the shard's actor name, which a split or a restart keeps."""
from __future__ import annotations

import threading
import time

STEP_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


# Ray drops a gauge not set again within two export intervals: the KV gauges are set this often
# from a thread of their own, so an idle shard still reports its pool
GAUGE_REFRESH_S = 2.0


class ShardMetrics:
    def __init__(self, shard: str, kv_blocks):
        """kv_blocks() -> (used, total) blocks of the shard's pool, read every GAUGE_REFRESH_S."""
        from ray.util.metrics import Gauge, Histogram
        self.step = Histogram("shardserve_shard_step_seconds", "one step's compute in a shard (decode or prefill)",
                              boundaries=STEP_S, tag_keys=("shard", "kind"))
        self.kv_used = Gauge("shardserve_kv_blocks_used", "KV blocks held by sequences and prefix holders",
                             tag_keys=("shard",))
        self.kv_total = Gauge("shardserve_kv_blocks_total", "KV blocks of the shard's pool", tag_keys=("shard",))
        for m in (self.step, self.kv_used, self.kv_total):
            m.set_default_tags({"shard": shard})
        self._kv_blocks = kv_blocks
        threading.Thread(target=self._refresh, name="metrics", daemon=True).start()

    def stepped(self, seconds: float, decode: bool) -> None:
        self.step.observe(seconds, tags={"kind": "decode" if decode else "prefill"})

    def _refresh(self) -> None:
        while True:
            used, total = self._kv_blocks()
            self.kv_used.set(used)
            self.kv_total.set(total)
            time.sleep(GAUGE_REFRESH_S)
