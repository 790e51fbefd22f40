"""Correctness at scale: a synthetic published shape (`shardserve synth`, seed 0) through the
chained stages against transformers on the same folder, teacher-forced on WikiText-2.

    .venv/bin/python bench/scale_correctness.py --like llama-3.2-1b \
        --json bench/results/scale-correctness-llama-3.2-1b.json

fp32 stages (2 shards' ranges) against transformers' fp32 LlamaForCausalLM / Qwen2ForCausalLM:
max |logit diff| and top-1 agreement over `--positions` positions. Then the default spec
against our fp32: top-1 agreement, mean |diff| and relative L2 error (the weights are noise, so
this measures the quantization error on a real layout, not quality). The folder is made once under
~/.cache/shardserve/synth/ (or `--folder`).
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from serving.stamp import stamp

CACHE = Path.home() / ".cache" / "shardserve" / "synth"


def folder_for(like: str, given: str | None) -> Path:
    from shards.model.synth import synth
    if given:
        return Path(given)
    out = CACHE / f"{like}-seed0"
    if not (out / "model.safetensors.index.json").exists():
        t = time.time()
        synth(like, out)
        print(f"synth {like}: {time.time() - t:.0f} s", flush=True)
    return out


def hf_logits(folder: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    del model
    gc.collect()
    return out


def our_logits(folder: Path, ids: list[int], compression: str):
    from shards.compress.costs import measure_costs
    from shards.model.generator import Generator
    from shards.model.source import open_source
    from shards.plan.planner import plan
    source = open_source(str(folder))
    gen = Generator(source, plan(measure_costs(source, compression), 2, compression=compression).ranges,
                    compression=compression)
    out = gen.logits(ids)
    del gen
    gc.collect()
    return out


def main() -> int:
    from serving.launch import SERVE_DEFAULT
    from shards.compress.spec import parse
    from shards.data import wikitext_ids
    from shards.model.source import open_source
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", default="llama-3.2-1b")
    ap.add_argument("--folder", default=None)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = folder_for(args.like, args.folder)
    ids = wikitext_ids(open_source(str(folder)).tokenizer())[1000:1000 + args.positions]
    want = hf_logits(folder, ids)
    fp32 = our_logits(folder, ids, "fp32")
    default = parse(SERVE_DEFAULT).spec
    quant = our_logits(folder, ids, default)
    result = {"meta": stamp(), "like": args.like, "positions": len(ids), "stages": 2,
              "fp32_max_abs_diff": (fp32 - want).abs().max().item(),
              "fp32_top1_agreement": (fp32.argmax(-1) == want.argmax(-1)).float().mean().item(),
              "logit_abs_max": want.abs().max().item(), "default_spec": default,
              "default_top1_agreement_vs_fp32": (quant.argmax(-1) == fp32.argmax(-1)).float().mean().item(),
              "default_mean_abs_diff_vs_fp32": (quant - fp32).abs().mean().item(),
              "logit_std": fp32.std().item(),
              # random weights give near-flat logits (a top-1 margin of a few hundredths), so the
              # error relative to the logits says more than top-1 agreement
              "default_relative_l2_vs_fp32": ((quant - fp32).norm() / fp32.norm()).item()}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
