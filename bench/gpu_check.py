"""The CUDA paths, checked by hand on a machine with a GPU (no test depends on one).

Random weights at SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, vocab
49152), saved as a Hugging Face folder: the default GGUF (94 MiB) does not travel to a lent GPU
machine. For fp32, bf16 and bitsandbytes int8 / nf4 / fp4, two stages [0, 15) + [15, 30) on
cuda:0 against transformers' LlamaForCausalLM on the same GPU: logit error over a prompt, top-1
agreement, greedy tokens, weight bytes and CUDA memory, a decode step's time at batch 1 / 32;
then the compiled decode step on CUDA against the eager one.

    python bench/gpu_check.py --out gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.model.generator import Generator  # noqa: E402
from shards.model.source import HFFolderSource  # noqa: E402
from shards.model.step import SamplingParams, StepBatch  # noqa: E402

QUANTS = ("fp32", "bf16", "llm-int8", "nf4", "fp4")
DEV = "cuda"      # --device cpu: a dry run of this script on a machine without a GPU
PROMPT_LEN, NEW = 64, 32


def random_model(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # initializer_range 0.05 (not 0.02): peakier logits, fewer near ties in the greedy check
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      initializer_range=0.05)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model.to(DEV)


def prompts(n: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n, length), generator=g).tolist()


@torch.inference_mode()
def hf_reference(model, ids: list[int], batch: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
    logits = model(torch.tensor([ids], device=DEV)).logits[0].float()    # [len, vocab]
    out = model.generate(torch.tensor(batch, device=DEV), max_new_tokens=NEW, do_sample=False,
                         min_new_tokens=NEW, pad_token_id=0)
    return logits, out[:, len(batch[0]):].tolist()


def decode_ms(gen: Generator, batch: int, steps: int = 20) -> float:
    """Median ms of one decode step (all stages) for `batch` sequences with 64 cached tokens."""
    sids = list(range(10_000, 10_000 + batch))
    for s, p in zip(sids, prompts(batch, PROMPT_LEN, seed=7)):
        gen.step(StepBatch([s], [0], [PROMPT_LEN], tokens=torch.tensor([p])))
    times = []
    for i in range(steps):
        b = StepBatch(sids, [PROMPT_LEN + i] * batch, [1] * batch, tokens=torch.ones(batch, 1, dtype=torch.long))
        sync()
        t = time.perf_counter()
        gen.step(b)
        sync()
        times.append(1000 * (time.perf_counter() - t))
    for s in sids:
        gen.free(s)
    return sorted(times)[len(times) // 2]


def check(src, quant: str, ref_logits, ref_tokens, ids, batch, compile: bool = False,
          dtype: torch.dtype = torch.float32) -> dict:
    """dtype: the stages' activations and KV (bf16: the whole step in bf16)."""
    sync()
    before = allocated()
    t = time.perf_counter()
    gen = Generator(src, 2, kv_blocks=512, dtype=dtype, compression=quant, device=DEV,
                    compile=compile)
    built_s = time.perf_counter() - t
    logits = gen.logits(ids).float()
    if DEV != "cpu" and not compile:   # the same spec on the CPU: do the CUDA kernels compute the same?
        on_cpu = Generator(src, 2, kv_blocks=16, dtype=dtype, compression=quant).logits(ids).float()
        cpu_diff = float((logits.cpu() - on_cpu).abs().max())
    else:
        cpu_diff = None
    greedy = gen.generate(batch, SamplingParams(max_tokens=NEW), stop_at_eos=False)
    row = {"quant": quant, "dtype": str(dtype)[6:], "compiled": compile, "build_s": round(built_s, 1),
           "weight_mib": round(sum(s.weight_bytes() for s in gen.stages) / 2**20, 1),
           "cuda_alloc_mib": round((allocated() - before) / 2**20, 1),
           "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
           "max_abs_diff_vs_cpu": cpu_diff,
           "top1_agree": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
           "greedy_equal_hf": sum(a == b for a, b in zip(greedy, ref_tokens)),
           "first_diff": min((next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), NEW)
                              for a, b in zip(greedy, ref_tokens)), default=NEW),
           "decode_ms_b1": round(decode_ms(gen, 1), 2), "decode_ms_b32": round(decode_ms(gen, 32), 2)}
    row["tokens"] = greedy
    del gen
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def allocated() -> int:
    if DEV == "cuda":
        return torch.cuda.memory_allocated()
    import psutil
    return psutil.Process().memory_info().rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu.json")
    ap.add_argument("--folder", default="/tmp/smollm2-shape-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-by-s", type=float, default=240, help="skip compiled runs not started by then")
    ap.add_argument("--quants", nargs="*", default=list(QUANTS))
    args = ap.parse_args()
    global DEV
    DEV = args.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__}
    try:
        import bitsandbytes
        report["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as e:
        report["bitsandbytes"] = f"missing: {e}"
    model = random_model(Path(args.folder))
    src = HFFolderSource(args.folder)
    ids, batch = prompts(1, PROMPT_LEN)[0], prompts(4, 16, seed=3)
    ref_logits, ref_tokens = hf_reference(model, ids, batch)
    del model
    bf16 = torch.bfloat16
    runs = [(q, False, torch.float32) for q in args.quants] + [("bf16", False, bf16)]
    runs += [] if args.no_compile else [("fp32", True, torch.float32), ("bf16", True, bf16)]
    report["rows"] = []
    t0 = time.perf_counter()
    for quant, compile, dtype in runs:
        if compile and time.perf_counter() - t0 > args.compile_by_s:
            print(json.dumps({"quant": quant, "compiled": True, "skipped": "--compile-by-s passed"}), flush=True)
            continue
        row = checked(src, quant, ref_logits, ref_tokens, ids, batch, compile, dtype, report["rows"])
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        report["rows"].append(row)
        Path(args.out).write_text(json.dumps(report, indent=1))


def checked(src, quant, ref_logits, ref_tokens, ids, batch, compile, dtype, done: list[dict]) -> dict:
    """check(), its failure as a row (one path failing must not hide the others' numbers), and
    for a compiled row how many greedy replies equal the eager row's of the same spec."""
    try:
        row = check(src, quant, ref_logits, ref_tokens, ids, batch, compile, dtype)
    except Exception as e:
        return {"quant": quant, "dtype": str(dtype)[6:], "compiled": compile, "error": f"{type(e).__name__}: {e}"[:600]}
    if compile:
        eager = next((r for r in done if r["quant"] == quant and r.get("dtype") == row["dtype"]
                      and not r["compiled"]), {})
        row["greedy_equal_eager"] = sum(a == b for a, b in zip(row["tokens"], eager.get("tokens", [])))
    return row


if __name__ == "__main__":
    main()
