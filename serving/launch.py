"""Wiring: plan the shards, start their actors, wait until loaded, hand back an Engine."""
from __future__ import annotations

import logging

from serving.config import Config
from shards.plan.footprint import Overheads
from shards.plan.plan import Plan

SERVE_DEFAULT = "fast"   # = w4a8x2: the file's own 4-bit weights, activations at ~15 bits
log = logging.getLogger("shardserve.launch")


def serving_compression(spec: str | None, source) -> str:
    """What a pipeline serves: `spec`, or when none is given, a prepared artifact's own, or
    SERVE_DEFAULT (the fastest spec within 1% of fp32's perplexity, docs/compression.md)."""
    if spec is not None:
        return spec
    return source.default_compression if source.applied is not None else SERVE_DEFAULT


def make_plan(cfg: Config, nodes: list | None = None) -> Plan:
    """The shard map for cfg. With placement, every shard names the node it is pinned to
    (`nodes`: the cluster's, read from the connected Ray when not given)."""
    import dataclasses

    from shards.compress.costs import measure_costs
    from shards.compress.spec import parse
    from shards.model.source import open_source
    from shards.plan.planner import plan
    source = open_source(cfg.model.name)
    # a preset resolved to its spec: shards report it, and the controller's ladder is written in specs
    comp = parse(serving_compression(cfg.model.compression, source)).spec
    costs = measure_costs(source, comp)
    ov = overheads(cfg, comp)
    shards = 0 if cfg.model.shards == "auto" else cfg.model.shards
    if not cfg.server.placement:
        device = "cpu" if cfg.model.device == "auto" else cfg.model.device
        return _compiled(plan(costs, shards, cfg.cache.budgets, cfg.cache.kv_tokens, compression=comp,
                              device=device, overheads=ov), cfg)
    from shards.plan.placement import place
    if nodes is None:
        from serving.cluster import cluster_nodes
        nodes = cluster_nodes()
    p = place(costs, nodes, shards or len(nodes), cfg.cache.kv_tokens, comp, cfg.server.replicas, cfg.cache.budgets, ov)
    if cfg.model.device != "auto":
        p = dataclasses.replace(p, shards=tuple(dataclasses.replace(s, device=cfg.model.device) for s in p.shards))
    return _compiled(p, cfg)


def overheads(cfg: Config, spec: str) -> Overheads:
    """What each shard process holds besides weights and KV (shards/plan/footprint.py): its
    runtime and inductor's, measured on this machine (shards/runtime/probe.py), and the
    scheduler's step sizes its workspace is sized for."""
    import dataclasses

    from shards.compress.spec import parse
    from shards.runtime.probe import measure_overheads
    method = parse(spec).method
    # a fused decode compiles no graph (and loads no inductor) on the CPU; "auto" plans as the CPU
    graph = method.compiles and not (method.fused_decode and not cfg.model.device.startswith("cuda"))
    ov = measure_overheads(cfg.model.compile and graph, method.bitsandbytes,
                           cfg.scheduler.max_batch, cfg.scheduler.prefill_tokens)
    return dataclasses.replace(ov, dequantizes=method.dequantizes, load_layers=method.load_layers)


def _compiled(p: Plan, cfg: Config) -> Plan:
    import dataclasses
    return dataclasses.replace(p, shards=tuple(dataclasses.replace(s, compile=cfg.model.compile) for s in p.shards))


def replica_prefixes(cfg: Config) -> list[str]:
    """Actor-name prefix of each data-parallel pipeline: `<prefix><fingerprint>-`, then `r<k>-`
    per replica when there are several. The fingerprint (Config.fingerprint) keeps a redeploy
    with another model, shard count or compression from attaching to the running shards."""
    base = f"{cfg.server.prefix}{cfg.fingerprint()}-"
    if cfg.server.replicas <= 1:
        return [base]
    return [f"{base}r{k}-" for k in range(cfg.server.replicas)]


def start(cfg: Config) -> tuple[Plan, list, int, list[str]]:
    """Plan, then adopt the pipeline's running shards (`adopt`) or start one actor per shard.
    Returns (plan, handles, KV blocks per shard, actor names), the shards in pipeline order.
    Deterministic, so the CLI and a Serve replica get the same actors."""
    from shards.runtime.actor import start_shards
    threads = None
    if cfg.server.placement:
        from serving.cluster import cluster_nodes
        nodes = cluster_nodes()
        p = make_plan(cfg, nodes)
        threads = _threads(p, nodes, cfg.server.replicas)
    else:
        p = make_plan(cfg)
    kv_blocks = min(s.kv_tokens for s in p.shards) // cfg.cache.block_size
    running = adopt(cfg.server.prefix, p)
    if running is not None:
        return running[0], running[1], kv_blocks, running[2]
    handles = start_shards(cfg.model.name, list(p.shards), kv_blocks, cfg.cache.block_size, cfg.server.prefix, threads)
    return p, handles, kv_blocks, [f"{cfg.server.prefix}shard-{s.index}" for s in p.shards]


def adopt(prefix: str, fresh: Plan, timeout_s: float = 600.0) -> tuple[Plan, list, list[str]] | None:
    """The shards of pipeline `prefix` that already run (started by the CLI, or routed by a
    router that died), as they are now: after moves, splits and re-placements their layers,
    count and nodes differ from a fresh plan, so the plan is read back from the shards, ordered
    by first layer. None when none run. When they do not answer within timeout_s (loading
    counts) or do not cover the model's layers once each (one of them lost), they are killed
    and None returned: a fresh start beats a pipeline with a gap."""
    import dataclasses
    import re

    import ray

    from shards.errors import PlanError
    from shards.plan.layer_range import LayerRange
    from shards.runtime.actor import NAMESPACE
    ours = re.compile(re.escape(prefix) + r"shard-\d+$")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and ours.match(a["name"])]
    if not names:
        return None
    handles = [ray.get_actor(n, namespace=NAMESPACE) for n in names]
    try:
        ray.get([h.ready.remote() for h in handles], timeout=timeout_s)
        stats = ray.get([h.stats.remote() for h in handles], timeout=60)
        order = sorted(range(len(names)), key=lambda i: stats[i].start)
        base = fresh.shards[0]
        plan = dataclasses.replace(fresh, shards=tuple(dataclasses.replace(
            base, index=k, layers=LayerRange(stats[i].start, stats[i].end), compression=stats[i].compression,
            device=stats[i].device, node=stats[i].node_id, weight_bytes=stats[i].weight_bytes,
            kv_bytes=stats[i].kv_bytes_reserved, budget_bytes=stats[i].budget_bytes)
            for k, i in enumerate(order)))
    except (ray.exceptions.RayError, PlanError, ValueError) as e:
        for h in handles:
            ray.kill(h)
        log.warning("running shards %s not adopted (%s); starting afresh", ", ".join(names), e)
        return None
    return plan, [handles[i] for i in order], [names[i] for i in order]


def measured_ladder(model: str, served: str, specs: tuple[str, ...] = ()) -> dict:
    """The controller's compression ladder for this model: `specs` (default: the registry's
    ladder methods) and the served spec, ordered by the bytes of one layer at each, measured
    here (lightest compression first), as ControllerConfig's `ladder` and `ladder_bytes` (bytes
    / the first's)."""
    from shards.compress import registry
    from shards.compress.costs import ladder_bytes
    from shards.model.source import open_source
    steps = tuple(dict.fromkeys(specs + (served,))) if specs else registry.ladder(served)
    measured = ladder_bytes(open_source(model), steps)
    order = sorted(measured, key=measured.get, reverse=True)
    return {"ladder": tuple(order), "ladder_bytes": tuple(measured[s] / measured[order[0]] for s in order)}


def _threads(p: Plan, nodes: list, replicas: int) -> list[int]:
    """Torch threads per shard: its node's CPUs shared by the shards of every replica there."""
    cpus = {n.node_id: n.cpus for n in nodes}
    on_node = {s.node: sum(t.node == s.node for t in p.shards) * replicas for s in p.shards}
    return [max(1, int(cpus.get(s.node, 1) // on_node[s.node])) for s in p.shards]


async def build_engine(cfg: Config, on_ready=None):
    """Start the shard actors (and the controller) for cfg and return a running Engine.
    on_ready(k, stats) is called as each shard finishes loading (progress bars)."""
    import asyncio

    from serving.control.pipeline import Pipeline
    from serving.router.engine import Engine
    from serving.router.metrics import RouterMetrics
    from shards.model.source import open_source
    # planning reads the model file and measures costs (seconds of CPU): off the loop, which
    # in a Serve replica must keep answering health checks and Serve's queue-length probes
    p, handles, kv_blocks, names = await asyncio.to_thread(start, cfg)

    async def wait(k, h):
        st = await h.ready.remote()
        if on_ready:
            on_ready(k, st)
    await asyncio.gather(*(wait(k, h) for k, h in enumerate(handles)))
    # this router is the pipeline's only one: KV a dead predecessor left behind is freed
    await asyncio.gather(*(h.free_all.remote() for h in handles))
    controller, settings = None, None
    if cfg.controller.enabled:
        from serving.control.controller import start_controller
        settings = cfg.controller
        if not settings.ladder_bytes:     # the ladder's bytes measured on the served model
            ladder = await asyncio.to_thread(measured_ladder, cfg.model.name, p.shards[0].compression,
                                             settings.ladder)
            settings = settings.model_copy(update=ladder)
        start_controller(cfg.server.prefix, settings.model_dump())
        controller = f"{cfg.server.prefix}controller"
    source = open_source(cfg.model.name)
    eos = source.config.eos_token_id
    tokenizer = await asyncio.to_thread(source.tokenizer)
    pipeline = Pipeline.of(cfg.model.name, p, handles, kv_blocks, cfg.cache.block_size, cfg.server.prefix,
                        cfg.transport.compiled_graph, cfg.transport.channels, settings, names)
    engine = Engine(pipeline, tokenizer, set(eos if isinstance(eos, list) else [eos]), cfg.scheduler,
                    controller=controller, prefix_cache=cfg.cache.prefix_cache,
                    metrics=RouterMetrics(cfg.server.prefix or "default"))
    # the first request after a start took 268 ms against 55-58 for the next ones (2 shards, in
    # process, 1 generated token): the path's first use, paid here. A prompt under one KV block,
    # so the prefix cache pins nothing
    await engine.warm_up(tokenizer.encode("Hello, world")[:cfg.cache.block_size - 1])
    return engine
