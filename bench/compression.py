"""Quality, bytes and speed of every compression method and preset, one command:

    .venv/bin/python bench/compression.py --seqlen 512 --windows 8 --json bench/compression.json --plot bench/compression.png

Per spec: WikiText-2 perplexity (docs/benchmarks.md, "Protocols"; the same windows for all), measured resident
weight bytes of the whole model, ratios to fp32, and decode speed of one stage holding all
30 layers (batch 1 and 8, 128-token prompts, 32 decode steps, this process's threads).
The fp32 baseline is the GGUF's Q4_1 weights dequantized to fp32.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from serving.stamp import stamp

SPECS = ["fp32", "bf16", "w8a16", "w8a8", "w4a8x2", "llm-int8", "nf4", "fp4", "magnitude:0.5", "wanda:0.5", "2:4",
         "cut-mlp:0.2", "cut-heads:0.25", "drop-layers:2", "nf4+wanda:0.5", "fast", "balanced", "smallest"]


def decode_speed(stage, batch: int, prompt: int = 128, steps: int = 32) -> float:
    """Tokens/s of `steps` batched decode steps after a prefill of `prompt` tokens each."""
    import torch

    from shards.model.step import StepBatch
    sids = list(range(batch))
    stage(StepBatch(sids, [0] * batch, [prompt] * batch, tokens=torch.randint(100, 1000, (batch, prompt))))
    t = time.perf_counter()
    for s in range(steps):
        stage(StepBatch(sids, [prompt + s] * batch, [1] * batch, tokens=torch.randint(100, 1000, (batch, 1))))
    dt = time.perf_counter() - t
    for sid in sids:
        stage.free(sid)
    return batch * steps / dt


def measure(source, spec: str, seqlen: int, windows: int) -> dict:
    from shards.compress.perplexity import perplexity
    from shards.model.stage import Stage
    from shards.plan.layer_range import LayerRange
    r = perplexity(source, spec, seqlen, windows)
    stage = Stage(source, LayerRange(0, source.n_layers), kv_blocks=8 * 10, compression=spec)
    return {**r.to_dict(), "spec": spec, "decode_tok_s_b1": decode_speed(stage, 1),
            "decode_tok_s_b8": decode_speed(stage, 8)}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["weight_bytes"] / 2**20, r["ppl"], s=25)
        ax.annotate(r["spec"], (r["weight_bytes"] / 2**20, r["ppl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("resident weight MiB (whole model)")
    ax.set_ylabel(f"WikiText-2 perplexity (seqlen {rows[0]['seqlen']}, {rows[0]['windows']} windows), log")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: quality vs memory per compression")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["spec"] == "fp32")
    out = ["| spec | resolved | ppl | ppl / fp32 | weight MiB | bytes / fp32 | decode tok/s b=1 | b=8 |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['spec']} | {r['compression']} | {r['ppl']:.2f} | {r['ppl'] / base['ppl']:.2f} | "
                   f"{r['weight_bytes'] / 2**20:.1f} | {r['weight_bytes'] / base['weight_bytes']:.2f} | "
                   f"{r['decode_tok_s_b1']:.1f} | {r['decode_tok_s_b8']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--specs", nargs="*", default=SPECS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    from shards.model.source import open_source
    source = open_source(args.model)
    rows = []
    for spec in args.specs:
        rows.append(measure(source, spec, args.seqlen, args.windows))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": stamp(), "model": args.model, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
