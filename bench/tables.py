"""Markdown tables of the results under bench/results/, each headed by its stamp (commit, date, CPU,
cores, torch, Ray): docs/benchmarks.md's tables are this script's output.

    .venv/bin/python bench/tables.py > /tmp/tables.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from serving import bench
from shards.compress.registry import canonical, is_method

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20


def stamp(meta: dict) -> str:
    return (f"*Stamp: commit {meta['commit']}, {meta['date']}, {meta['cpu']}, {meta['cores']} cores, "
            f"torch {meta['torch']}, Ray {meta['ray']}.*")


def _spec(name: str) -> str:
    """A spec as the registry names it now (results may carry older aliases)."""
    head, _, rest = name.partition("+")
    return (canonical(head) if is_method(head) else head) + (f"+{rest}" if rest else "")


def http(result: dict) -> str:
    """bench.table, headed by the prompts' passage length where there is one, and followed by
    shardserve's per-token time split at each level (serving/bench.py::time_split)."""
    head = (f"Each prompt after a {result['context_tokens']}-token WikiText-2 passage, "
            f"{result['max_tokens']} new tokens.\n\n" if result.get("context_tokens") else "")
    split = [r for r in result.get("shardserve") or [] if (r.get("time_split") or {}).get("shard_compute_ms")]
    if not split:
        return head + bench.table(result)
    rows = ["| c | shard compute ms | hops + router ms | Serve + HTTP ms |", "|---:|---:|---:|---:|"]
    for r in split:
        t = r["time_split"]
        rows.append(f"| {r['concurrency']} | {t['shard_compute_ms']:.1f} | {_num(t.get('ray_router_ms'), '.2f')} | "
                    f"{_num(t.get('serve_http_ms'), '.2f')} |")
    return head + bench.table(result) + "\n\nshardserve's time a token, medians:\n\n" + "\n".join(rows)


def compression(result: dict) -> str:
    base = next(r for r in result["rows"] if r["spec"] == "fp32")
    rows = ["| spec | ppl | ppl / fp32 | weights MiB | bytes / fp32 | decode tok/s b=1 | b=8 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        name = _spec(r["compression"]) + ("" if r["spec"] == r["compression"] else f" (preset `{r['spec']}` then)")
        rows.append(f"| {name} | {r['ppl']:.2f} | {r['ppl'] / base['ppl']:.2f} | "
                    f"{r['weight_bytes'] / MiB:.1f} | {r['weight_bytes'] / base['weight_bytes']:.2f} | "
                    f"{r.get('decode_tok_s_b1') or 0:.1f} | {r.get('decode_tok_s_b8') or 0:.1f} |")
    return "\n".join(rows)


def plan_vs_rss(result: dict) -> str:
    """bench/plan_memory.py: planned against measured, per shard (each shard loaded alone)."""
    return f"Model `{result['model']}`, {result['shards']} shards.\n\n" + _plan_rows(result["rows"])


def _plan_rows(rows: list[dict]) -> str:
    out = ["| spec | shard | layers | weights | KV | runtime | compiled | workspace | at rest: plan / RSS | "
           "serving: plan / peak | load peak: bound / VmHWM | load s (compiling) | source GiB/s loading |",
           "|---|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|"]
    for r in rows:
        p, m = r["plan"], r["measured"]

        def pair(a, b):
            return f"{a / MiB:.0f} / {b / MiB:.0f} ({100 * (a / b - 1):+.1f}%)"
        out.append(f"| {r['compression']} | {r['index']} | {r['layers']} | {p['weights'] / MiB:.0f} | {p['kv'] / MiB:.0f} | "
                   f"{p['runtime'] / MiB:.0f} | {p['compiled'] / MiB:.0f} | {p['workspace'] / MiB:.0f} | "
                   f"{pair(p['at_rest'], m['at_rest'])} | {pair(p['total'], m['serving_peak'])} | "
                   f"{pair(p['load_peak'], m['load_peak'])} | {r['load_s']} ({r['compile_s']}) | {r['source_gib_per_s'] or '-'} |")
    return "\n".join(out)


def bandwidth(result: dict) -> str:
    """bench/bandwidth.py: STREAM triad, GiB/s by torch threads."""
    t = result["triad_gib_s"]
    return ("| threads | triad GiB/s |\n|---:|---:|\n" +
            "\n".join(f"| {k} | {v:.1f} |" for k, v in t.items()) + f"\n\n{result['mib_per_array']} MiB per array.")


def load_speed(result: dict) -> str:
    """bench/load_speed.py: the parts of loading, timed on the same layers."""
    out = [f"Model `{result['model']}`, {result['rows'][0]['layers']} layers, {result['rows'][0]['source_gib']} GiB "
           "of source tensors.", "",
           "| spec | read, cold GiB/s | read, cached GiB/s | built as fp32 GiB/s | built at the spec GiB/s | "
           "reading | converting | quantizing |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        out.append(f"| {_spec(r['compression'])} | {_num(r['read_cold_gib_s'], '.2f')} | {r['read_gib_s']:.2f} | "
                   f"{r['source_gib'] / r['fp32_s']:.2f} | {r['built_gib_s']:.2f} | {r['read_share']:.0%} | "
                   f"{r['convert_share']:.0%} | {r['quantize_share']:.0%} |")
    return "\n".join(out)


def controller(result: dict) -> str:
    rows = [f"{result['requests']} requests ({result['tokens']} tokens) in {result['seconds']:.0f} s, "
            f"{result['failed']} failed, {len(result['step_errors'])} failed steps recomputed.", "",
            "| t s | action | shard | seconds | layers after | RSS MiB by actor, before -> after |",
            "|---:|---|---|---:|---|---|"]
    for e in result["events"]:
        shape = " ".join(f"[{x['start']}, {x['end']}) {_spec(x['compression'])}" for x in e["after"])
        rss = "-" if "rss_before" not in e else \
            f"{' + '.join(map(str, e['rss_before'].values()))} -> {' + '.join(map(str, e['rss_after'].values()))}"
        rows.append(f"| {e['t']:.1f} | {e['action']} | {e['shard']} | {e['seconds']:.1f} | {shape} | {rss} |")
    return "\n".join(rows)


def chaos(result: dict) -> str:
    v = result["verdict"]
    rows = [f"{v['requests']} requests at c={result['args']['concurrency']} ({result['args']['max_tokens']} tokens "
            f"max, greedy) on 2 replicas x 2 shards: {v['completed']} completed, all equal to the calm run; "
            f"{v['failed']} failed, all in flight at the replica's kill, each with an error body, the last "
            f"{v['failed_ended_within_s_of_kill']:.1f} s after it. At the end: {v['kv_blocks_used']} KV blocks "
            f"held, {len(v['orphan_actors'])} orphan actors, {len(v['orphan_processes'])} orphan shard processes.",
            "", "| t s | fault | target | detected s | recovered s | how |", "|---:|---|---|---:|---:|---|"]
    for f in result["timeline"]:
        how = f.get("reason") or ("shards re-adopted" if f.get("shards_readopted") else "")
        if "replaced_s" in f:
            how = f"re-placed in {f['replaced_s']:.1f} s; {how}"
        if f["fault"] == "split+patch":
            how = f"PATCH waited {f['patch_waited_s']:.1f} s for the split, kept: {f['patch_kept']}"
        rows.append(f"| {f['t']:.0f} | {f['fault']} | {f['target']} | {_num(f.get('detected_s'), '.1f')} | "
                    f"{f['recovered_s']:.1f} | {how[:140]} |")
    return "\n".join(rows)


def scale_correctness(result: dict) -> str:
    return "\n".join([
        f"Synthetic `{result['like']}` (seed 0), {result['positions']} teacher-forced WikiText-2 positions, "
        f"{result['stages']} chained stages.", "",
        "| compared | max abs logit diff | top-1 agreement |", "|---|---:|---:|",
        f"| fp32 stages vs transformers fp32 (logits up to {result['logit_abs_max']:.1f}) | "
        f"{result['fp32_max_abs_diff']:.2e} | {result['fp32_top1_agreement']:.3f} |",
        f"| {result['default_spec']} stages vs fp32 stages (relative L2 error "
        f"{result['default_relative_l2_vs_fp32']:.3f}; logit std {result['logit_std']:.2f}) | "
        f"mean {result['default_mean_abs_diff_vs_fp32']:.3f} | {result['default_top1_agreement_vs_fp32']:.3f} |"])


def cuda(result: dict) -> str:
    rows = [f"{result['device']}, bitsandbytes {result['bitsandbytes']}.", "",
            "| spec | compiled | weights MiB | CUDA MiB | max diff vs CPU | greedy = HF (of 4) | decode ms b=1 | b=32 |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "skipped" in r or "error" in r:
            continue
        cells = [_num(r.get(k), f) for k, f in (("weight_mib", ".0f"), ("cuda_alloc_mib", ".0f"),
                                                 ("max_abs_diff_vs_cpu", ".1e"), ("greedy_equal_hf", "d"),
                                                 ("decode_ms_b1", ".1f"), ("decode_ms_b32", ".1f"))]
        rows.append(f"| {_spec(r['quant'])} | {r['compiled']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def grammar_engines(result: dict) -> str:
    rows = ["| engine | tokenizer + compiler, s | schema compile, ms | mask p50, us | p90 | max |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("xgrammar", "llguidance"):
        r = result[name]
        m = r["mask_us"]
        rows.append(f"| {name} | {r['compiler_s']:.2f} | {1000 * r['compile_s']:.1f} | {m['p50']:.1f} | "
                    f"{m['p90']:.1f} | {m['max']:.0f} |")
    return (f"A {result['doc_tokens']}-token JSON document decoded token by token under a 6-property schema, "
            f"vocabulary {result['vocab']}.\n\n" + "\n".join(rows))


def structured_output(result: dict) -> str:
    rows = ["| round | batch | unconstrained ITL p50, ms | wall, s |", "|---:|---|---:|---:|"]
    for r in result["runs"]:
        batch = "16 plain" if not r["constrained"] else f"{16 - r['constrained']} plain + {r['constrained']} json_schema"
        rows.append(f"| {r['round']} | {batch} | {r['plain_itl_ms_p50']:.1f} | {r['wall_s']:.2f} |")
    v = result["validity"]
    return ("\n".join(rows) + f"\n\nMedian over rounds: {result['plain_itl_ms']:.1f} ms alone, "
            f"{result['mixed_itl_ms']:.1f} ms beside constrained requests ({100 * result['slowdown']:+.1f}%). "
            f"Validity: {v['valid']} of {v['requests']} replies under the person schema validate "
            f"({v['finished_stop']} ended on their own).")


def lm_eval_quality(result: dict) -> str:
    rows = ["| spec | accuracy | loglikelihoods | max abs diff vs transformers fp32 | mean abs diff | greedy flag agrees |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rows.append(f"| {_spec(r['spec'])} | {r['acc']:.3f} ({r['questions']} questions) | {r['loglikelihoods']} | "
                    f"{r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | {r['greedy_flag_agrees']} |")
    return "\n".join(rows) + "\n\n`fast` is the default spec (`w4a8x2`)."


DECODE_VARIANTS = {"A": "A: share", "B": "B: every core when alone", "T": "T: share, kernel team when alone",
                   "S": "S: T, OpenMP threads never spin"}


def decode_threads(result: dict) -> str:
    import statistics
    order = result.get("order", "ABBA")
    names = sorted(set(order), key="ABTS".index)        # the first is the base of the ratios
    base, others = names[0], names[1:]
    rows = ["| concurrency (requests) | " + " | ".join(f"{DECODE_VARIANTS[v]}, tok/s" for v in names) + " | "
            + " | ".join(f"{v} / {base}" for v in others) + " |",
            "|---|" + "---|" * len(names) + "---:|" * len(others)]
    for c, n in result["levels"]:
        tok = {v: [r["tok_s"] for r in result["runs"] if r["variant"] == v and r["c"] == c] for v in names}
        rows.append(f"| {c} ({n}) | " + " | ".join(" / ".join(f"{x:.1f}" for x in tok[v]) for v in names) + " | "
                    + " | ".join(f"{statistics.fmean(tok[v]) / statistics.fmean(tok[base]):.2f}" for v in others) + " |")
    return f"Model: {result['model']}, 2 shards, servers in the order {' '.join(order)}.\n\n" + "\n".join(rows)


def startup(result: dict) -> str:
    """bench/startup.py: `serve --shards 2 --ask` to its answer, empty caches then warm."""
    rows = ["| round | caches | to the answer s | to exit s | caches on disk MiB |", "|---:|---|---:|---:|---:|"]
    for r in result["runs"]:
        rows.append(f"| {r['round']} | {r['kind']} | {_num(r['answer_s'], '.1f')} | {r['exit_s']:.1f} | "
                    f"{r['cache_mb']:.0f} |")
    return f"Model: {result['model']}, 2 shards.\n\n" + "\n".join(rows)


def cpu_split(result: dict) -> str:
    """bench/cpu_split.py: CPU milliseconds a generated token costs in each process."""
    rows = ["| process | CPU ms a token |", "|---|---:|"]
    big = [r for r in result["processes"] if r["ms_per_token"] >= 0.2]
    rows += [f"| `{r['process'][:60]}` | {r['ms_per_token']:.2f} |" for r in big]
    total = sum(r["ms_per_token"] for r in result["processes"])
    rows.append(f"| {len(result['processes']) - len(big)} others | {total - sum(r['ms_per_token'] for r in big):.2f} |")
    return (f"Model: {result['model']}, 2 shards, c={result['concurrency']}, {result['tokens']} tokens at "
            f"{result['tokens_per_s']:.1f} tok/s (so {2e3 / result['tokens_per_s']:.1f} core-ms a token on "
            f"2 cores). All processes: {total:.1f} CPU ms a token.\n\n" + "\n".join(rows))


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


RENDER = {"chaos": chaos, "scale-correctness": scale_correctness, "http-serving": http, "compression": compression, "quantization": compression, "plan-vs-rss": plan_vs_rss, "bandwidth": bandwidth, "load-speed": load_speed, "controller": controller,
          "cuda-paths": cuda, "grammar-engines": grammar_engines, "lm-eval-quality": lm_eval_quality, "decode-threads": decode_threads, "cpu-split": cpu_split, "structured-output": structured_output,
          "startup": startup}


def render(path: Path) -> str:
    result = json.loads(path.read_text())
    kind = next(k for k in RENDER if path.stem.startswith(k))
    return f"### {path.stem}\n\n{stamp(result['meta'])} Source: `bench/results/{path.name}`.\n\n{RENDER[kind](result)}\n"


def main() -> int:
    for path in sorted(RESULTS.glob("*.json")):
        print(render(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
