"""Wiring: plan the shards, start their actors, wait until loaded, hand back an Engine."""
from __future__ import annotations

from dataclasses import dataclass

from shards.plan.plan import Plan


@dataclass
class EngineConfig:
    model: str = "default"
    shards: int = 2
    budgets: list[int] | None = None     # bytes per shard; None: reserve kv_tokens each
    kv_tokens: int = 8192                # KV per shard when no budgets are given
    block_size: int = 16
    max_batch: int = 32
    prefill_tokens: int = 256
    compression: str | None = None       # spec for every shard (shards/compress/spec.py);
                                         # None: fp32, or a prepared artifact's own
    device: str = "auto"                 # auto: cuda when the node has a GPU, else cpu
    prefix: str = ""                     # actor names are <prefix>shard-<k>, <prefix>controller
    max_waiting: int = 256               # requests queued beyond the running ones; more get 429
    timeout_s: float = 600.0             # a request still running after this is aborted (504)
    control: bool = True                 # run the controller (serving/control/controller.py)
    controller: dict | None = None       # its settings: serving.control.policy.ControllerConfig fields
    replicas: int = 1                    # data-parallel pipelines behind the endpoint
    placement: bool = True               # pin each shard to a node chosen by memory (shards/plan/placement.py)
    compile: bool = False                # compiled decode steps (shards/model/compiled.py; the CLI's default)
    compiled_graph: bool = False         # steps through a Ray Compiled Graph (serving/control/pipeline.py)
    channels: bool = True                # steps over a socket per shard, not Ray calls (shards/runtime/channel.py)
    prefix_cache: bool = True            # prompts start after a cached block prefix (serving/router/prefix.py)


def make_plan(cfg: EngineConfig, nodes: list | None = None) -> Plan:
    """The shard map for cfg. With placement, every shard names the node it is pinned to
    (`nodes`: the cluster's, read from the connected Ray when not given)."""
    import dataclasses

    from shards.compress.costs import measure_costs
    from shards.compress.spec import parse
    from shards.model.source import open_source
    from shards.plan.planner import plan
    source = open_source(cfg.model)
    # a preset resolved to its spec: shards report it, and the controller's ladder is written in specs
    comp = parse(cfg.compression or source.default_compression).spec
    costs = measure_costs(source, comp)
    if not cfg.placement:
        device = "cpu" if cfg.device == "auto" else cfg.device
        return _compiled(plan(costs, cfg.shards, cfg.budgets, cfg.kv_tokens, compression=comp, device=device), cfg)
    from shards.plan.placement import place
    if nodes is None:
        from serving.cluster import cluster_nodes
        nodes = cluster_nodes()
    p = place(costs, nodes, cfg.shards or len(nodes), cfg.kv_tokens, comp, cfg.replicas, cfg.budgets)
    if cfg.device != "auto":
        p = dataclasses.replace(p, shards=tuple(dataclasses.replace(s, device=cfg.device) for s in p.shards))
    return _compiled(p, cfg)


def _compiled(p: Plan, cfg: EngineConfig) -> Plan:
    import dataclasses
    return dataclasses.replace(p, shards=tuple(dataclasses.replace(s, compile=cfg.compile) for s in p.shards))


def replica_prefixes(cfg: EngineConfig) -> list[str]:
    """Actor-name prefix of each data-parallel pipeline: `<prefix>r<k>-` with replicas, else
    `<prefix>` (one pipeline, the names it always had)."""
    if cfg.replicas <= 1:
        return [cfg.prefix]
    return [f"{cfg.prefix}r{k}-" for k in range(cfg.replicas)]


def start(cfg: EngineConfig) -> tuple[Plan, list, int]:
    """Plan, then start (or attach to, by name) one actor per shard. Returns (plan, handles,
    KV blocks per shard). Deterministic, so the CLI and a Serve replica get the same actors."""
    from shards.runtime.actor import start_shards
    threads = None
    if cfg.placement:
        from serving.cluster import cluster_nodes
        nodes = cluster_nodes()
        p = make_plan(cfg, nodes)
        threads = _threads(p, nodes, cfg.replicas)
    else:
        p = make_plan(cfg)
    kv_blocks = min(s.kv_tokens for s in p.shards) // cfg.block_size
    return p, start_shards(cfg.model, list(p.shards), kv_blocks, cfg.block_size, cfg.prefix, threads), kv_blocks


def measured_ladder(model: str, served: str) -> dict:
    """The controller's compression ladder for this model: the registry's ladder methods and the
    served spec, ordered by the bytes of one layer at each, measured here (lightest compression
    first), as ControllerConfig's `ladder` and `ladder_bytes` (bytes / the first's)."""
    from shards.compress import registry
    from shards.compress.costs import ladder_bytes
    from shards.model.source import open_source
    measured = ladder_bytes(open_source(model), registry.ladder(served))
    order = sorted(measured, key=measured.get, reverse=True)
    return {"ladder": tuple(order), "ladder_bytes": tuple(measured[s] / measured[order[0]] for s in order)}


def _threads(p: Plan, nodes: list, replicas: int) -> list[int]:
    """Torch threads per shard: its node's CPUs shared by the shards of every replica there."""
    cpus = {n.node_id: n.cpus for n in nodes}
    on_node = {s.node: sum(t.node == s.node for t in p.shards) * replicas for s in p.shards}
    return [max(1, int(cpus.get(s.node, 1) // on_node[s.node])) for s in p.shards]


async def build_engine(cfg: EngineConfig, on_ready=None):
    """Start the shard actors (and the controller) for cfg and return a running Engine.
    on_ready(k, stats) is called as each shard finishes loading (progress bars)."""
    import asyncio

    from serving.control.pipeline import Pipeline
    from serving.router.engine import Engine
    from shards.model.source import open_source
    # planning reads the model file and measures costs (seconds of CPU): off the loop, which
    # in a Serve replica must keep answering health checks and Serve's queue-length probes
    p, handles, kv_blocks = await asyncio.to_thread(start, cfg)

    async def wait(k, h):
        st = await h.ready.remote()
        if on_ready:
            on_ready(k, st)
    await asyncio.gather(*(wait(k, h) for k, h in enumerate(handles)))
    # this router is the pipeline's only one: KV a dead predecessor left behind is freed
    await asyncio.gather(*(h.free_all.remote() for h in handles))
    controller = None
    if cfg.control:
        from serving.control.controller import start_controller
        ladder = await asyncio.to_thread(measured_ladder, cfg.model, p.shards[0].compression)
        start_controller(cfg.prefix, {**ladder, **(cfg.controller or {})})
        controller = f"{cfg.prefix}controller"
    source = open_source(cfg.model)
    eos = source.config.eos_token_id
    tokenizer = await asyncio.to_thread(source.tokenizer)
    pipeline = Pipeline(cfg.model, p, handles, kv_blocks, cfg.block_size, cfg.prefix, cfg.compiled_graph,
                        cfg.channels)
    engine = Engine(pipeline, tokenizer, set(eos if isinstance(eos, list) else [eos]),
                    cfg.max_batch, cfg.prefill_tokens, controller=controller, max_waiting=cfg.max_waiting,
                    timeout_s=cfg.timeout_s, prefix_cache=cfg.prefix_cache)
    # the first request after a start took 268 ms against 55-58 for the next ones (2 shards, in
    # process, 1 generated token): the path's first use, paid here. A prompt under one KV block,
    # so the prefix cache pins nothing
    await engine.warm_up(tokenizer.encode("Hello, world")[:cfg.block_size - 1])
    return engine
