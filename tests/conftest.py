"""Shared fixtures. Heavy ones (the real model, transformers' reference) are session-scoped."""
from __future__ import annotations

import os

import pytest

from shards.data import read_prompts as prompts  # noqa: F401  (tests import it from here)

# shard actors started by the tests (their Ray workers inherit this process's environment) take
# injected faults; a deployment's do not (shards/runtime/actor.py, inject_fault)
os.environ["SHARDSERVE_FAULTS"] = "1"
TIERS = ("unit", "model", "ray", "slow")


def pytest_collection_modifyitems(config, items):
    """Every test names its tier (README, "Development"): `unit` needs no model and no Ray,
    `model` loads the default model or builds a kernel, `ray` starts a local Ray cluster,
    `slow` is a bench or a soak. A test with none is refused, so the tiers stay true."""
    bare = [item.nodeid for item in items if not any(item.get_closest_marker(m) for m in TIERS)]
    if bare:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {', '.join(bare)}")


def chat_ids(tok, text: str) -> list[int]:
    from shards.model.source import chat_prompt_ids
    return chat_prompt_ids(tok, [{"role": "user", "content": text}])


@pytest.fixture(scope="session")
def source():
    from shards.model.source import open_source
    return open_source("default")


@pytest.fixture(scope="session")
def tokenizer(source):
    return source.tokenizer()


@pytest.fixture(scope="session")
def hf_model(source):
    """transformers' own LlamaForCausalLM, loaded by its own GGUF loader (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    m = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name,
                                             dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random-weight 4-layer Llama saved as a HF folder (config.json + safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loop():
    """A local Ray cluster (namespace shardserve) and an event loop, per test module."""
    import asyncio

    import ray
    ray.init(namespace="shardserve", include_dashboard=False, log_to_driver=False)
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()
    ray.shutdown()


def chain(stages, batch):
    """One step through stages in order, hidden states handed on: the last stage's output."""
    x = None
    for s in stages:
        x = s(batch if x is None else batch.with_hidden(x, s.layers.start))
    return x


def tokens_after_move_and_recompress(src, a, b, prompt: list[int], spec: str = "w8a16", n: int = 6) -> list[int]:
    """Stages a = [0, 2) and b = [2, 4): prefill `prompt`, move layer 2 from b to a, recompress b
    at `spec`, then n greedy tokens through the changed pair."""
    import torch

    from shards.model.step import StepBatch
    from shards.plan.layer_range import LayerRange
    logits = chain((a, b), StepBatch([0], [0], [len(prompt)], tokens=torch.tensor([prompt])))
    a.grow(src, LayerRange(2, 3), **b.shrink(LayerRange(2, 3)))
    b.recompress(src, spec)
    toks = []
    for i in range(n):
        toks.append(int(logits.argmax(-1)))
        logits = chain((a, b), StepBatch([0], [len(prompt) + i], [1], tokens=torch.tensor([[toks[-1]]])))
    return toks

