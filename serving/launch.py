"""Wiring: plan the shards, start their actors, wait until loaded, hand back an Engine."""
from __future__ import annotations

from dataclasses import dataclass

from shards.plan import Plan


@dataclass
class EngineConfig:
    model: str = "default"
    shards: int = 2
    budgets: list[int] | None = None     # bytes per shard; None: reserve kv_tokens each
    kv_tokens: int = 8192                # KV per shard when no budgets are given
    block_size: int = 16
    max_batch: int = 32
    prefill_tokens: int = 256
    compression: str | None = None       # spec for every shard (shards/compression.py);
                                         # None: fp32, or a prepared artifact's own
    device: str = "auto"                 # auto: cuda when the node has a GPU, else cpu
    prefix: str = ""                     # actor names are <prefix>shard-<k>, <prefix>controller
    max_waiting: int = 256               # requests queued beyond the running ones; more get 429
    timeout_s: float = 600.0             # a request still running after this is aborted (504)
    control: bool = True                 # run the controller (serving/controller.py)
    controller: dict | None = None       # its settings: serving.policy.ControllerConfig fields


def make_plan(cfg: EngineConfig) -> Plan:
    from shards.memory import measure_costs
    from shards.planner import plan
    from shards.source import open_source
    device = cfg.device
    if device == "auto":
        import ray
        device = "cuda" if ray.cluster_resources().get("GPU", 0) >= cfg.shards else "cpu"
    source = open_source(cfg.model)
    comp = cfg.compression or source.default_compression
    return plan(measure_costs(source, comp), cfg.shards, cfg.budgets, cfg.kv_tokens, compression=comp,
                device=device)


def start(cfg: EngineConfig) -> tuple[Plan, list, int]:
    """Plan, then start (or attach to, by name) one actor per shard. Returns (plan, handles,
    KV blocks per shard). Deterministic, so the CLI and a Serve replica get the same actors."""
    from shards.actor import start_shards
    p = make_plan(cfg)
    kv_blocks = min(s.kv_tokens for s in p.shards) // cfg.block_size
    return p, start_shards(cfg.model, list(p.shards), kv_blocks, cfg.block_size, cfg.prefix), kv_blocks


async def build_engine(cfg: EngineConfig, on_ready=None):
    """Start the shard actors (and the controller) for cfg and return a running Engine.
    on_ready(k, stats) is called as each shard finishes loading (progress bars)."""
    import asyncio

    from serving.engine import Engine
    from serving.pipeline import Pipeline
    from shards.source import open_source
    p, handles, kv_blocks = start(cfg)

    async def wait(k, h):
        st = await h.ready.remote()
        if on_ready:
            on_ready(k, st)
    await asyncio.gather(*(wait(k, h) for k, h in enumerate(handles)))
    controller = None
    if cfg.control:
        from serving.controller import start_controller
        start_controller(cfg.prefix, cfg.controller)
        controller = f"{cfg.prefix}controller"
    source = open_source(cfg.model)
    eos = source.config.eos_token_id
    pipeline = Pipeline(cfg.model, p, handles, kv_blocks, cfg.block_size, cfg.prefix)
    return Engine(pipeline, source.tokenizer(), set(eos if isinstance(eos, list) else [eos]),
                  cfg.max_batch, cfg.prefill_tokens, controller=controller, max_waiting=cfg.max_waiting,
                  timeout_s=cfg.timeout_s)
