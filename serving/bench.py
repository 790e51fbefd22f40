"""`shardserve bench`: drive a live OpenAI-compatible endpoint the way users do
(docs/benchmarks.md, "Protocols") and put the baselines beside it in the same run.

Prompts from prompts-500.jsonl through the chat template, streaming, max_tokens 64,
temperature 0, at each concurrency level. Per level: aggregate completion tokens/s, p50/p99
latency, time to first token, inter-token latency; per shard actor: peak RSS (VmHWM). Baselines:
transformers `generate` in this process (batch = concurrency, same prompts) and llama.cpp's
`llama-server` with the same GGUF when the binary is on PATH.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _one(client, url: str, prompt: str, max_tokens: int, headers: dict, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, stamps, usage = time.perf_counter(), [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    n = (usage or {}).get("completion_tokens") or len(stamps)
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (stamps[0] if stamps else end) - t0, "tokens": n,
            "itl": (stamps[-1] - stamps[0]) / (n - 1) if len(stamps) > 1 and n > 1 else None}


async def http_level(url: str, prompts: list[str], concurrency: int, max_tokens: int = 64,
                     api_key: str | None = None) -> dict:
    """All prompts through `url` with at most `concurrency` in flight."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    # a new connection per request: llama-server drops idle keep-alive connections, and a reused
    # one it closed fails the request ("Server disconnected"); loopback connects cost ~0.1 ms
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        models = await client.get(f"{url}/v1/models", headers=headers)   # the name the server answers to
        model = models.json()["data"][0]["id"] if models.status_code == 200 else "default"

        async def run(p):
            async with sem:
                return await _one(client, url, p, max_tokens, headers, model)
        t = time.perf_counter()
        rs = await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - t
    lat, ttft = [r["latency"] for r in rs], [r["ttft"] for r in rs]
    itl = [r["itl"] for r in rs if r["itl"] is not None]
    toks = sum(r["tokens"] for r in rs)
    return {"concurrency": concurrency, "requests": len(rs), "completion_tokens": toks, "wall_s": wall,
            "tokens_per_s": toks / wall, "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99),
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
            "itl_p50_ms": 1000 * _pct(itl, 0.5), "itl_mean_ms": 1000 * statistics.fmean(itl) if itl else None}


def hf_level(model, tok, prompts: list[str], batch: int, max_tokens: int = 64) -> dict:
    """transformers generate, greedy, left-padded batches of `batch` prompts, in this process."""
    import torch

    from shards.model.source import chat_prompt_ids
    ids = [chat_prompt_ids(tok, [{"role": "user", "content": p}]) for p in prompts]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    toks, t = 0, time.perf_counter()
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        width = max(map(len, chunk))
        inp = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
        for row in out[:, width:].tolist():   # count up to and including the first eos
            toks += next((k + 1 for k, x in enumerate(row) if x in eos), len(row))
    wall = time.perf_counter() - t
    return {"concurrency": batch, "requests": len(ids), "completion_tokens": toks, "wall_s": wall,
            "tokens_per_s": toks / wall}


def llama_server(gguf: str, port: int = 8090, threads: int | None = None, context: int = 0):
    """Start llama.cpp's server on the GGUF; (process, url), or None without a binary ($LLAMA_SERVER,
    llama-server on PATH, or .llama/build/bin/llama-server from deploy/build-llama-server.sh).
    32 slots, each `context` + 1024 tokens long (llama-server splits -c among its slots)."""
    from pathlib import Path
    built = Path(__file__).resolve().parents[1] / ".llama" / "build" / "bin" / "llama-server"
    binary = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server") or (str(built) if built.is_file() else None)
    if binary is None:
        return None
    import httpx
    cmd = [binary, "-m", gguf, "--port", str(port), "-np", "32", "-c", str(32 * (context + 1024)), "-cb",
           "-t", str(threads or os.cpu_count())]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"llama-server on {gguf} did not become healthy in 120 s")


def time_split(url: str, level: dict, since: float, api_key: str | None = None) -> dict:
    """Per-token time at one level, split: shard compute (each shard's median decode step),
    Ray hops + router (the router's launch-to-tokens median minus that), and Serve + HTTP
    (the client's median inter-token latency minus the router's). At concurrency > 1 the
    groups overlap, so the parts are medians of each, not a sum of one token's."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t = httpx.get(f"{url}/v1/shards", params={"since": since}, headers=headers, timeout=30).json()["timing"]
    hop, itl = t["decode_hop_ms_p50"], level["itl_p50_ms"]
    return {**t, "serve_http_ms": None if hop is None or itl is None else itl - hop}


def shard_memory(url: str, api_key: str | None = None) -> list[dict]:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    shards = httpx.get(f"{url}/v1/shards", headers=headers, timeout=30).json()["shards"]
    keys = ("index", "start", "end", "compression", "peak_rss_bytes", "rss_bytes", "base_rss_bytes",
            "weight_bytes", "kv_bytes_reserved", "steps", "step_ms_mean")
    return [{k: s.get(k) for k in keys} for s in shards]


def table(result: dict) -> str:
    rows = ["| system | c | tok/s | p50 s | p99 s | TTFT p50 s | ITL p50 ms | vs HF |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    hf = {r["concurrency"]: r["tokens_per_s"] for r in result.get("hf_generate", [])}
    for system in ("shardserve", "llama_server", "hf_generate"):
        for r in result.get(system) or []:
            ratio = r["tokens_per_s"] / hf[r["concurrency"]] if r["concurrency"] in hf else float("nan")
            rows.append(f"| {system} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r.get('p50_s', float('nan')):.2f} | "
                        f"{r.get('p99_s', float('nan')):.2f} | {r.get('ttft_p50_s', float('nan')):.2f} | "
                        f"{r.get('itl_p50_ms') or float('nan'):.1f} | {ratio:.2f} |")
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in ("shardserve", "hf_generate", "llama_server"):
        rows = result.get(system) or []
        if rows:
            ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (HF: batch size)")
    ax.set_ylabel("completion tokens/s")
    ax.set_title(f"{result['model']}, {result['shards']} shards, {result['compression']}, 64 new tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def llama_server_levels(source, prompts, concurrency: list[int], max_tokens: int,
                        context: int = 0) -> tuple[list | None, str | None]:
    """llama.cpp's llama-server on the source's GGUF at each concurrency (prompts(c) -> its
    prompts, each after `context` tokens of passage): (levels, None), or (None, why it was skipped)."""
    try:
        started = llama_server(str(source.path), context=context)
        note = "no llama-server binary ($LLAMA_SERVER, PATH, .llama/build/bin; deploy/build-llama-server.sh builds it)"
    except RuntimeError as e:   # it never came up: the other rows still count
        started, note = None, str(e)
    if started is None:
        return None, f"skipped: {note}"
    proc, url = started
    try:
        return [asyncio.run(http_level(url, prompts(c), c, max_tokens)) for c in concurrency], None
    finally:
        proc.kill()


def hf_levels(source, prompts, concurrency: list[int], max_tokens: int) -> list[dict]:
    """transformers' `generate` in this process, fp32, batch = concurrency, the same prompts."""
    import torch
    from transformers import AutoModelForCausalLM
    where = ({"pretrained_model_name_or_path": source.path.parent, "gguf_file": source.path.name}
             if hasattr(source, "path") else {"pretrained_model_name_or_path": source.folder})
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    levels = []
    for c in concurrency:
        levels.append(hf_level(model, source.tokenizer(), prompts(c), c, max_tokens))
        print("hf_generate", json.dumps(levels[-1]), flush=True)
    return levels


@contextlib.contextmanager
def serving(port: int, *flags: str, timeout_s: float = 600):
    """`shardserve serve` with these CLI flags as a child in a process group of its own; yields
    its URL once /healthz answers 200. Stopped with Ctrl-C (the CLI then stops its app, actors
    and Ray), the group killed after."""
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
            if time.time() > deadline:
                raise RuntimeError(f"the server did not become healthy in {timeout_s:.0f} s")
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    import httpx
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
