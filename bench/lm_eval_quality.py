"""A compressed pipeline's quality through the server, as an evaluation harness reads it:
lm-evaluation-harness's `local-completions` model on the facts task (tests/data/facts.*),
served at each spec, every loglikelihood against transformers' fp32 on the same tokens.

    .venv/bin/python bench/lm_eval_quality.py --specs fp32 fast --json bench/results/lm-eval-quality.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from serving.bench import serving
from serving.stamp import stamp

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def evaluate(url: str, workdir: Path) -> tuple[object, dict]:
    """lm-eval on the facts task through url: (its model object, its results with samples)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    (workdir / "facts.yaml").write_text((DATA / "facts.yaml").read_text().replace("DATA_FILE", str(DATA / "facts.jsonl")))
    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="shardserve-default", tokenizer_backend="remote",
                             num_concurrent=4, max_retries=1)
    out = simple_evaluate(model=lm, tasks=["shardserve_facts"], task_manager=TaskManager(include_path=str(workdir)),
                          log_samples=True)
    return lm, out


def compare(lm, out: dict, hf_model) -> dict:
    """Accuracy, and each loglikelihood against transformers' on the tokens lm-eval sent."""
    import torch
    diffs, agree, n = [], 0, 0
    for s in out["samples"]["shardserve_facts"]:
        for (context, continuation), ((ll, greedy),) in zip(s["arguments"], s["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            with torch.no_grad():
                lp = torch.log_softmax(hf_model(torch.tensor([ctx + cont])).logits[0].float(), -1)[len(ctx) - 1:-1]
            want = float(sum(lp[i, t] for i, t in enumerate(cont)))
            diffs.append(abs(ll - want))
            agree += greedy == bool(all(int(lp[i].argmax()) == t for i, t in enumerate(cont)))
            n += 1
    return {"acc": out["results"]["shardserve_facts"]["acc,none"], "questions": len(out["samples"]["shardserve_facts"]),
            "loglikelihoods": n, "max_abs_diff": max(diffs), "mean_abs_diff": statistics.fmean(diffs),
            "greedy_flag_agrees": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["fp32", "fast"])
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from shards.model.source import open_source
    src = open_source("default")
    hf = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name, dtype=torch.float32).eval()
    rows = []
    for spec in args.specs:
        with serving(args.port, "--shards", "2", "--compression", spec) as url, tempfile.TemporaryDirectory() as d:
            lm, out = evaluate(url, Path(d))
            rows.append({"spec": spec, **compare(lm, out, hf)})     # lm's tokenizer is the server's
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": stamp(), "model": "default", "reference": "transformers fp32", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
