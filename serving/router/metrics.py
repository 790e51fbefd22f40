"""The router's Prometheus series, recorded through Ray's metrics (ray.util.metrics): they are
exported by every node's Ray metrics agent (as `ray_shardserve_...`), and the app's `/metrics`
route gathers them (serving/api/app.py). The shards record their own (shards/runtime/metrics.py).

Times are seconds. Every series carries the pipeline's actor-name prefix as `pipeline`, so the
replicas of one app and the apps of one cluster stay apart.
"""
from __future__ import annotations

TTFT_S = [0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
ITL_S = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
LATENCY_S = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
GAUGE_REFRESH_S = 2.0


class RouterMetrics:
    """What the router records: per request (time to first token, inter-token latency, latency,
    tokens), per step (round trip), and the queue, the prefix cache, the controller's actions
    and recoveries."""

    def __init__(self, pipeline: str):
        from ray.util.metrics import Counter, Gauge, Histogram
        tags = ("pipeline",)

        def hist(name, doc, bounds, keys=tags):
            h = Histogram(name, doc, boundaries=bounds, tag_keys=keys)
            h.set_default_tags({"pipeline": pipeline})
            return h

        def count(name, doc, keys=tags):
            c = Counter(name, doc, tag_keys=keys)
            c.set_default_tags({"pipeline": pipeline})
            return c

        def gauge(name, doc):
            g = Gauge(name, doc, tag_keys=tags)
            g.set_default_tags({"pipeline": pipeline})
            return g
        self.ttft = hist("shardserve_time_to_first_token_seconds", "request start to its first token", TTFT_S)
        self.itl = hist("shardserve_inter_token_latency_seconds", "time between a request's tokens", ITL_S)
        self.latency = hist("shardserve_request_latency_seconds", "request start to its last token", LATENCY_S)
        self.prompt_tokens = count("shardserve_prompt_tokens", "prompt tokens of finished requests")
        self.generation_tokens = count("shardserve_generation_tokens", "tokens generated")
        self.requests = count("shardserve_requests", "requests admitted")
        self.running = gauge("shardserve_requests_running", "requests holding KV on the shards")
        self.waiting = gauge("shardserve_requests_waiting", "requests queued")
        self.prefix_hits = count("shardserve_prefix_cache_hits", "prompts started after a cached prefix")
        self.prefix_tokens = count("shardserve_prefix_cache_tokens", "prompt tokens copied, not computed")
        self.step = hist("shardserve_step_round_trip_seconds", "a step from launch to tokens back, through "
                         "every shard and hop", ITL_S + [10, 30], ("pipeline", "kind"))
        self.actions = count("shardserve_controller_actions", "controller actions carried out",
                             ("pipeline", "kind", "ok"))
        self.recoveries = count("shardserve_recoveries", "dead or hung shards re-placed (or not)", ("pipeline", "ok"))
        self._prefix = (0, 0)      # the scheduler's prefix counts last seen

    def emitted(self, started: float, last: float | None, now: float, n: int) -> None:
        """n tokens reached a request's stream at `now` (perf_counter seconds); `last`: when its
        previous ones did (None: these are its first)."""
        if n <= 0:
            return
        if last is None:
            self.ttft.observe(now - started)
        else:
            for _ in range(n):          # a delta of n tokens (a multi-byte character): n gaps
                self.itl.observe((now - last) / n)
        self.generation_tokens.inc(n)

    def finished(self, started: float, now: float, prompt_tokens: int) -> None:
        self.latency.observe(now - started)
        self.prompt_tokens.inc(prompt_tokens)

    def queue(self, running: int, waiting: int) -> None:
        """The requests holding KV and those queued (set every GAUGE_REFRESH_S too: Ray drops a
        gauge not set again within two export intervals)."""
        self.running.set(running)
        self.waiting.set(waiting)

    def stepped(self, seconds: float, prefill: bool, prefix: tuple[int, int]) -> None:
        """A group came back: its round trip, the prefix cache's (hits, tokens) so far."""
        self.step.observe(seconds, tags={"kind": "prefill" if prefill else "decode"})
        hits, tokens = prefix[0] - self._prefix[0], prefix[1] - self._prefix[1]
        if hits > 0:
            self.prefix_hits.inc(hits)
            self.prefix_tokens.inc(tokens)
        self._prefix = prefix

    def acted(self, kind: str, ok: bool) -> None:
        self.actions.inc(tags={"kind": kind, "ok": str(ok).lower()})

    def recovered(self, ok: bool) -> None:
        self.recoveries.inc(tags={"ok": str(ok).lower()})
