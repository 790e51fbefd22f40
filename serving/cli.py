"""`shardserve` command line: plan, generate (more subcommands register in COMMANDS)."""
from __future__ import annotations

import argparse
import json
import sys

from shards.errors import ShardServeError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or a HF folder")
    p.add_argument("--shards", type=int, default=2, help="number of shards (layer ranges)")


def cmd_plan(args) -> int:
    from serving.units import parse_budgets
    from shards.memory import measure_costs
    from shards.planner import plan
    from shards.source import open_source
    source = open_source(args.model)
    p = plan(measure_costs(source), args.shards, parse_budgets(args.budget))
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return 0
    print(f"model {p.model}: {p.n_layers} layers in {len(p.shards)} shards")
    print(f"{'shard':>5} {'layers':>10} {'weights MiB':>12} {'KV MiB':>8} {'KV tokens':>10} {'budget MiB':>11}")
    for s in p.shards:
        budget = "-" if s.budget_bytes is None else f"{s.budget_bytes / 2**20:.0f}"
        print(f"{s.index:>5} {str(s.layers):>10} {s.weight_bytes / 2**20:>12.1f} "
              f"{s.kv_bytes / 2**20:>8.1f} {s.kv_tokens:>10} {budget:>11}")
    return 0


def cmd_generate(args) -> int:
    """Generate in one process through the chained stages (no Ray)."""
    from shards.generator import Generator
    from shards.source import chat_prompt_ids, open_source
    from shards.step import SamplingParams
    source = open_source(args.model)
    tok = source.tokenizer()
    ids = chat_prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    gen = Generator(source, args.shards)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    out = gen.generate([ids], params)[0]
    print(tok.decode(out, skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show the shard map before any actor starts")
    _add_model_args(p)
    p.add_argument("--budget", help="memory per shard, comma-separated, e.g. 300MiB,300MiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("generate", help="generate one reply in-process through the chained stages")
    _add_model_args(p)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)
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
