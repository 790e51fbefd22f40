"""The reference generator's greedy output is token-identical to transformers' generate."""
import pytest
import torch

from shards.generator import Generator
from shards.step import SamplingParams
from tests.conftest import chat_ids, prompts


@pytest.fixture(scope="module")
def hf_greedy(tokenizer, hf_model):
    """10 prompts and transformers' 48 greedy tokens for each, generated past eos (min_new_tokens
    would instead forbid eos)."""
    batch = [chat_ids(tokenizer, p) for p in prompts(10)]
    eos = hf_model.generation_config.eos_token_id
    hf_model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            return batch, [hf_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                             pad_token_id=0)[0, len(ids):].tolist() for ids in batch]
    finally:
        hf_model.generation_config.eos_token_id = eos


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_matches_hf_generate(source, hf_greedy, compile):
    batch, want = hf_greedy
    gen = Generator(source, 3, compile=compile)
    # all 10 decode together (batched, different lengths), 48 new tokens, no early eos stop
    ours = gen.generate(batch, SamplingParams(max_tokens=48), stop_at_eos=False)
    assert [len(x) for x in ours] == [48] * 10 and ours == want
    assert all(s.kv.table.used_blocks == 0 for s in gen.stages)
    assert all(s.runs_compiled == compile for s in gen.stages)


def test_paris(source, tokenizer):
    ids = chat_ids(tokenizer, "What is the capital of France?")
    out = Generator(source, 2).generate([ids], SamplingParams(max_tokens=20))[0]
    assert tokenizer.decode(out, skip_special_tokens=True).strip() == "The capital of France is Paris."


def test_seeded_sampling_reproducible(source, tokenizer):
    ids = chat_ids(tokenizer, "Tell me a story.")
    gen = Generator(source, 2)
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_tokens=16)
    a, b = gen.generate([ids], p)[0], gen.generate([ids], p)[0]
    greedy = gen.generate([ids], SamplingParams(max_tokens=16))[0]
    assert a == b and a != greedy
