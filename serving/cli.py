"""`shardserve` command line: plan, generate (more subcommands register in COMMANDS)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from serving.config import Config, cli_flags, from_args
from shards.errors import ShardServeError
from shards.model.synth import DTYPES, SHAPES

MiB = 1 << 20


def _add_model_args(p: argparse.ArgumentParser, shards: bool = True) -> None:
    """--model, --compression (and --shards): the config's fields (serving/config.py)."""
    cli_flags(p, only=("model", "compression") + (("shards",) if shards else ()))


def config_of(args, **base) -> Config:
    """The config from the flags given (over `base`), its compression resolved: what `plan`,
    `serve` and `bench` would serve (serving/launch.py::serving_compression); `generate`,
    `eval` and `prepare` default to the model file's own weights (or an artifact's spec)."""
    from serving.launch import serving_compression
    from shards.model.source import open_source
    cfg = from_args(args, base)
    if cfg.model.compression is None:
        source = open_source(cfg.model.name)
        spec = serving_compression(None, source) if args.serving else source.default_compression
        cfg = cfg.replace(compression=spec)
    return cfg


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default=None,
                   help="calibrate Wanda / SparseGPT / GPTQ / cuts on this text or .jsonl file (your own domain) "
                        "instead of the serving prompts; the evaluated windows are skipped if it is the eval text")
    p.add_argument("--calibration-tokens", type=int, default=None,
                   help="tokens of --calibration to use (default 65536, 16384 for GPTQ; in rows of 256)")


def cmd_plan(args) -> int:
    """The shard map; with --address, placed on that Ray cluster's nodes (node of every shard)."""
    from serving.launch import make_plan
    nodes = None
    if args.address:
        import ray

        from serving.cluster import cluster_nodes
        ray.init(address=args.address, log_to_driver=False)
        nodes = cluster_nodes()
        ray.shutdown()
    cfg = config_of(args, placement=nodes is not None)
    p = make_plan(cfg, nodes)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    ips = {n.node_id: n.ip for n in nodes or []}
    print(f"model {p.model}: {p.n_layers} layers in {len(p.shards)} shards" +
          (f" on {len(nodes)} nodes ({cfg.server.replicas} replica(s))" if nodes else ""))
    print(f"{'shard':>5} {'layers':>10} {'weights':>8} {'KV':>7} {'runtime':>8} {'compiled':>9} {'workspace':>10} "
          f"{'total':>7} {'load peak':>10} {'KV tokens':>10} {'budget':>7}" + ("  device  node" if nodes else ""))
    for s in p.shards:
        f = s.footprint
        budget = "-" if s.budget_bytes is None else f"{s.budget_bytes / MiB:.0f}"
        where = f"  {s.device:<6}  {ips.get(s.node, '?')} {s.node[:12]}" if nodes else ""
        print(f"{s.index:>5} {str(s.layers):>10} {f.weights / MiB:>8.0f} {f.kv / MiB:>7.0f} {f.runtime / MiB:>8.0f} "
              f"{f.compiled / MiB:>9.0f} {f.workspace / MiB:>10.0f} {f.total / MiB:>7.0f} {f.load_peak / MiB:>10.0f} "
              f"{s.kv_tokens:>10} {budget:>7}{where}")
    print("MiB. total: the shard process's resident bytes while serving; a budget counts all but its runtime; "
          "load peak: at rest plus the layer being built in fp32")
    return 0


def cmd_generate(args) -> int:
    """Generate in one process through the chained stages (no Ray)."""
    from shards.model.generator import Generator
    from shards.model.source import chat_prompt_ids, open_source
    from shards.model.step import SamplingParams
    cfg = config_of(args)
    source = open_source(cfg.model.name)
    tok = source.tokenizer()
    ids = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    gen = Generator(source, cfg.model.shards, compression=cfg.model.compression)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    out = gen.generate([ids], params)[0]
    print(tok.decode(out, skip_special_tokens=True))
    return 0


def _wait_loaded(plan, handles, prefix: str) -> None:
    import ray
    from tqdm import tqdm
    pending = {h.ready.remote(): s for h, s in zip(handles, plan.shards)}
    with tqdm(total=len(pending), desc=f"loading {prefix}shards", unit="shard") as bar:
        while pending:
            done, _ = ray.wait(list(pending), timeout=1.0)
            for ref in done:
                st, spec = ray.get(ref), pending.pop(ref)
                bar.write(f"  {prefix}shard {spec.index}: layers {spec.layers}, {st.weight_bytes / 2**20:.0f} MiB "
                          f"weights, RSS {st.rss_bytes / 2**20:.0f} MiB, {st.device}, node {st.node}"
                          + (", decode fused" if st.fused else
                             f", decode compiled ({st.graphs} graphs, {st.compile_s:.0f} s)" if st.compiled else "")
                          + (", paged attention kernel" if st.attention_kernel else ""))
                bar.update()


def start_service(args, cfg: Config):
    """Start (or join) Ray, load the shards with progress bars, deploy the Serve app, wait for
    /healthz. Returns (client, url)."""
    import time

    import ray
    from ray import serve

    from serving.api.app import ShardServe
    from serving.api.client import Client
    from serving.ingress import check_port, choose, env, environment, starts_ray
    from serving.launch import replica_prefixes, start
    key = cfg.key()
    cfg.check_bind(args.host)
    ingress = choose(args.port, cfg.server.replicas, starts_ray(args.address), cfg.server.direct_ingress, args.host)
    if ingress.direct:
        check_port(args.host, args.port)
    with environment(env(ingress)):   # Ray's processes, started here, inherit it
        ray.init(address=args.address, namespace="shardserve", log_to_driver=False)
    started = [(prefix, *start(cfg.replace(prefix=prefix))) for prefix in replica_prefixes(cfg)]
    for prefix, plan, hs, *_ in started:   # every pipeline loads here, with progress bars
        _wait_loaded(plan, hs, prefix)
    serve.start(http_options={"host": args.host, "port": ingress.proxy_port})
    serve.run(ShardServe.options(num_replicas=cfg.server.replicas).bind(cfg.replace(api_key=key).model_dump()),
              name="shardserve", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    client = Client(url, api_key=key)
    deadline = time.time() + 300
    while not client.healthy():
        if time.time() > deadline:
            raise ShardServeError(f"{url}/healthz not ready after 300 s")
        time.sleep(0.5)
    return client, url


def stop_service(cfg: Config) -> None:
    """Undo start_service: the Serve app and this config's pipelines. Nothing when Ray was never
    connected (a refused start): connecting here could reach another cluster's Serve."""
    import ray
    if not ray.is_initialized():
        return
    from ray import serve

    from shards.runtime.actor import stop_pipeline
    serve.shutdown()
    # detached actors outlive us unless killed; by the pipelines' names, not our handles: the
    # router may have replaced a dead shard or split one onto a new actor since. Only this
    # config's (its fingerprint), not other deployments' of the same prefix
    stop_pipeline(f"{cfg.server.prefix}{cfg.fingerprint()}-")
    ray.shutdown()


def cmd_serve(args) -> int:
    """Serve until Ctrl-C (or answer --ask once and stop)."""
    import signal
    import time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even when started with & (SIG_IGN)
    cfg = config_of(args)
    try:
        client, url = start_service(args, cfg)
        print(f"shardserve: {cfg.model.name} in {cfg.model.shards} shards, OpenAI API at {url}/v1 (Ctrl-C stops)",
              flush=True)
        if args.ask:
            print(client.chat([{"role": "user", "content": args.ask}], max_tokens=args.max_tokens, temperature=0))
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shardserve: shutting down", flush=True)
    finally:
        stop_service(cfg)
    return 0


def cmd_bench(args) -> int:
    """Benchmark a live endpoint (--url) or one started here, with baselines in the same run."""
    import asyncio
    import time
    from pathlib import Path

    from serving import bench
    from shards.data import read_prompts, with_context
    from shards.model.source import open_source
    cfg = config_of(args)
    result = {"model": cfg.model.name, "shards": cfg.model.shards, "compression": cfg.model.compression,
              "compile": cfg.model.compile, "compiled_graph": cfg.transport.compiled_graph,
              "channels": cfg.transport.channels, "prefix_cache": cfg.cache.prefix_cache, "max_tokens": args.max_tokens,
              "context_tokens": args.context, "shardserve": [], "hf_generate": [], "llama_server": None}
    key = cfg.key()
    source = open_source(cfg.model.name)
    tok = source.tokenizer() if args.context else None
    count = lambda c: args.requests or max(8, 2 * c)  # noqa: E731
    first = {c: sum(count(b) for b in args.concurrency[:i]) for i, c in enumerate(args.concurrency)}
    prompts = lambda c: with_context(read_prompts(count(c)), args.context, tok, first[c])  # noqa: E731
    url = args.url
    try:
        if url is None:
            _, url = start_service(args, cfg)
        for c in args.concurrency:
            since = time.time()
            level = asyncio.run(bench.http_level(url, prompts(c), c, args.max_tokens, key))
            level["time_split"] = bench.time_split(url, level, since, key)
            result["shardserve"].append(level)
            print("shardserve", json.dumps(level), flush=True)
        result["shard_memory"] = bench.shard_memory(url, key)
    finally:
        if args.url is None:
            stop_service(cfg)
    if "llama-server" in args.baselines and hasattr(source, "path"):
        result["llama_server"], note = bench.llama_server_levels(source, prompts, args.concurrency, args.max_tokens,
                                                                  args.context)
        if note:
            result["llama_server_note"] = note
    if "hf" in args.baselines:
        result["hf_generate"] = bench.hf_levels(source, prompts, args.concurrency, args.max_tokens)
    print(bench.table(result))
    if args.json:
        from serving.stamp import stamp
        Path(args.json).write_text(json.dumps({"meta": stamp(), **result}, indent=2))
    if args.plot:
        bench.plot(result, args.plot)
    return 0


def cmd_prepare(args) -> int:
    """Compress and calibrate once, measure, write an artifact folder with a manifest."""
    from shards.compress.artifact import prepare
    from shards.model.source import open_source
    cfg = config_of(args)
    m = prepare(open_source(cfg.model.name), cfg.model.compression, args.out, args.seqlen, args.windows,
                progress=not args.json, calibration=calibration_data(args))
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{args.out}: {m['compression']}, weights {m['weight_bytes'] / 2**20:.1f} MiB, ppl "
              f"{m['ppl']['ppl']:.3f} ({m['ppl']['windows']} x {m['ppl']['seqlen']} tokens), dropped layers "
              f"{m['dropped_layers'] or 'none'}, {m['prepare_seconds']:.0f} s; serve it: shardserve serve --model {args.out}")
    return 0


def calibration_data(args):
    from shards.compress.calibration import CalibrationData
    return CalibrationData(args.calibration, args.calibration_tokens) if args.calibration else None


def cmd_eval(args) -> int:
    """WikiText-2 perplexity of the model under one compression."""
    from shards.compress.perplexity import DEFAULT_TEXT, perplexity
    from shards.model.source import open_source
    cfg = config_of(args)
    r = perplexity(open_source(cfg.model.name), cfg.model.compression, args.seqlen, args.windows,
                   args.text or DEFAULT_TEXT, progress=not args.json, calibration=calibration_data(args))
    if args.json:
        print(json.dumps(r.to_dict()))
    else:
        print(f"{r.compression}: ppl {r.ppl:.3f} over {r.windows} windows of {r.seqlen} tokens "
              f"({r.tokens} predictions), weights {r.weight_bytes / 2**20:.1f} MiB")
    return 0


def cmd_stop(args) -> int:
    """Kill the shard and controller actors a cluster keeps (they are detached: `serve shutdown`
    leaves them) and the Serve app."""
    import ray
    from ray import serve

    from shards.runtime.actor import stop_pipeline
    ray.init(address=args.address, log_to_driver=False)
    if not args.keep_serve:
        serve.shutdown()
    killed = stop_pipeline(args.prefix)
    print(f"stopped {len(killed)} actors: {', '.join(sorted(killed)) or 'none'}")
    ray.shutdown()
    return 0


def cmd_synth(args) -> int:
    """A random-weight Hugging Face folder of a published shape (shards/model/synth.py)."""
    from tqdm import tqdm

    from shards.model.synth import synth
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=f"synth {args.like}") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        out = synth(args.like, args.out, args.dtype, args.seed, overrides, progress)
    print(f"{out}: {args.like}, {args.dtype}, seed {args.seed}; random weights, for capacity, memory and speed")
    return 0


def cmd_budget(args) -> int:
    """Set one shard's memory budget on a running endpoint."""
    from serving.api.client import Client
    from serving.units import parse_bytes
    budget = None if args.bytes.lower() == "none" else parse_bytes(args.bytes)
    client = Client(args.url, api_key=args.api_key or os.environ.get("SHARDSERVE_API_KEY"),
                    admin_key=args.admin_key or os.environ.get("SHARDSERVE_ADMIN_KEY"))
    st = client.set_budget(args.shard, budget)
    print(f"shard {args.shard} layers [{st.start}, {st.end}): budget "
          f"{'none' if budget is None else f'{budget / 2**20:.0f} MiB'}, uses {st.used_bytes / 2**20:.0f} MiB now")
    return 0


def _add_service_args(p: argparse.ArgumentParser) -> None:
    """Every field of the config (serving/config.py) as a flag, plus where to listen."""
    cli_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.set_defaults(serving=True)


def _add_synth_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a random-weight HF folder of a published shape (capacity, speed)")
    p.add_argument("--like", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                   help="config fields over the shape's, e.g. num_hidden_layers=4 hidden_size=256")
    p.set_defaults(func=cmd_synth)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    ap.set_defaults(serving=False)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show the shard map before any actor starts")
    cli_flags(p, only=("model", "shards", "compression", "device", "kv_tokens", "budgets", "replicas"))
    p.add_argument("--budget", dest="budgets", default=argparse.SUPPRESS, type=lambda s: s.split(","),
                   help="the same as --budgets")
    p.add_argument("--address", default=None, help="place on this Ray cluster's nodes (e.g. auto)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan, serving=True)
    p = sub.add_parser("generate", help="generate one reply in-process through the chained stages")
    _add_model_args(p)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("eval", help="WikiText-2 perplexity under a compression spec")
    _add_model_args(p, shards=False)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first W windows (default: all)")
    p.add_argument("--text", default=None, help="path of wikitext-2-raw-test.txt (default ../shared/data/)")
    p.add_argument("--json", action="store_true")
    add_calibration_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("prepare", help="compress + calibrate once, measure, write an artifact folder")
    _add_model_args(p, shards=False)
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window for the manifest")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--json", action="store_true")
    add_calibration_args(p)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("serve", help="serve an OpenAI-compatible endpoint over Ray Serve")
    _add_service_args(p)
    p.add_argument("--ask", default=None, help="ask this once over HTTP, print the reply, shut down")
    p.add_argument("--max-tokens", type=int, default=64, help="for --ask")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("stop", help="stop the Serve app and the pipelines' actors on a cluster")
    p.add_argument("--address", default="auto")
    p.add_argument("--prefix", default="", help="only the pipelines of this app prefix")
    p.add_argument("--keep-serve", action="store_true", help="leave the Serve app running")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("budget", help="set one shard's memory budget on a running endpoint")
    p.add_argument("shard", help="its index, or its actor name")
    p.add_argument("bytes", help="e.g. 300MiB, or none")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-key", default=None, help="where the server has one (or SHARDSERVE_ADMIN_KEY)")
    p.set_defaults(func=cmd_budget)
    _add_synth_parser(sub)
    p = sub.add_parser("bench", help="tokens/s, latency, TTFT, ITL and shard memory over HTTP, with baselines")
    _add_service_args(p)
    p.add_argument("--url", default=None, help="bench this running endpoint instead of starting one")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=0, help="per level (default max(8, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=0,
                   help="put a WikiText-2 passage of this many tokens before each prompt (long-context load)")
    p.add_argument("--baselines", nargs="*", default=["hf", "llama-server"], help="hf, llama-server")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--plot", default=None, help="PNG of tokens/s vs concurrency per system")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ShardServeError as e:
        print(f"shardserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
