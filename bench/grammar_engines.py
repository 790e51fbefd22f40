"""xgrammar against llguidance on the served model's vocabulary: how long a JSON schema takes
to compile, and how long one token's mask takes while a valid document is decoded token by
token (the router fills a mask per constrained sequence per step; docs/benchmarks.md).

    .venv/bin/python bench/grammar_engines.py [--json bench/results/grammar-engines.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "kind": {"enum": ["person", "company"]}},
    "required": ["name", "age", "email", "tags", "address", "kind"], "additionalProperties": False}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@math.org", "tags": ["math", "engines"],
       "address": {"city": "London", "zip": "W1"}, "kind": "person"}


def xgrammar_run(tok, vocab: int, doc_ids: list[int]) -> dict:
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    t2 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in doc_ids:
        s = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - s)
        assert matcher.accept_token(t), f"xgrammar refused token {t}"
    return {"compiler_s": t1 - t0, "compile_s": t2 - t1, "mask_us": _stats(times)}


def llguidance_run(tok, vocab: int, doc_ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.numpy
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    assert not matcher.is_error(), matcher.get_error()
    mask = llguidance.numpy.allocate_token_bitmask(1, vocab)
    times = []
    for t in doc_ids:
        s = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - s)
        assert matcher.consume_token(t), f"llguidance refused token {t}: {matcher.get_error()}"
    return {"compiler_s": t1 - t0, "compile_s": t2 - t1, "mask_us": _stats(times)}


def _stats(seconds: list[float]) -> dict:
    us = sorted(1e6 * s for s in seconds)
    return {"p50": statistics.median(us), "p90": us[int(0.9 * len(us))], "max": us[-1], "mean": statistics.fmean(us)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from serving.stamp import stamp
    from shards.model.source import open_source
    src = open_source("default")
    tok = src.tokenizer()
    vocab = src.config.vocab_size
    doc_ids = tok.encode(json.dumps(DOC, separators=(",", ":")))
    out = {"meta": stamp(), "vocab": vocab, "doc_tokens": len(doc_ids),
           "xgrammar": xgrammar_run(tok, vocab, doc_ids), "llguidance": llguidance_run(tok, vocab, doc_ids)}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
