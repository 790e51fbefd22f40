"""The shared data folder (../shared/data beside the repository; SHARDSERVE_DATA overrides):
WikiText-2 raw test for quality, prompts-500.jsonl for serving load. Read there, never copied."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("SHARDSERVE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
WIKITEXT = DATA_DIR / "wikitext-2-raw-test.txt"
PROMPTS = DATA_DIR / "prompts-500.jsonl"


def read_prompts(n: int, start: int = 0) -> list[str]:
    lines = PROMPTS.read_text().splitlines()
    return [json.loads(x)["prompt"] for x in lines[start:start + n]]


def with_context(prompts: list[str], tokens: int, tokenizer, first: int = 0) -> list[str]:
    """Each prompt after a WikiText-2 passage of `tokens` tokens, a different one per prompt
    (consecutive parts of the file from passage `first`, wrapping): load at long context,
    "<passage>\n\n<prompt>". A bench level starts where the last one ended, so no level's
    passages are already in a prefix cache."""
    if tokens <= 0:
        return prompts
    ids = _wikitext_ids(tokenizer)
    n = len(ids) // tokens
    return [tokenizer.decode(ids[(k % n) * tokens:(k % n + 1) * tokens]).strip() + "\n\n" + p
            for k, p in enumerate(prompts, start=first)]


@functools.cache
def _wikitext_ids(tokenizer) -> list[int]:
    """The whole file's token ids (~300k for SmolLM2's vocabulary), once per tokenizer: the bench
    asks at every concurrency level."""
    return tokenizer(WIKITEXT.read_text())["input_ids"]


def wikitext_ids(tokenizer, path: str | os.PathLike = WIKITEXT) -> list[int]:
    """Token ids of a raw text file as the perplexity reader packs it (docs/compression.md,
    "Quality"): one row per line, whitespace-only rows empty, rows joined with blank lines."""
    rows = [line if line.strip() else "" for line in Path(path).read_text(encoding="utf-8").split("\n")]
    return tokenizer("\n\n".join(rows), add_special_tokens=False)["input_ids"]
