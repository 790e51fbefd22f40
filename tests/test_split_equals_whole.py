"""Chained stages of the real SmolLM2 (fp32) give transformers' LlamaForCausalLM logits."""
import pytest
import torch

from shards import LayerRange
from shards.compress.costs import measure_costs
from shards.model.generator import Generator
from shards.plan.planner import plan
from tests.conftest import chat_ids, prompts

pytestmark = pytest.mark.model

ATOL = 2e-3  # logits are O(10); fp32 sums in another order differ by ~1e-4


@pytest.fixture(scope="module")
def inputs(tokenizer):
    long = " ".join(prompts(40))
    return [[1], tokenizer.encode("The capital of France is"), chat_ids(tokenizer, prompts(1)[0]),
            tokenizer.encode(long)[:300]]


@pytest.mark.parametrize("n_stages", [1, 2, 3, 5])
def test_stages_match_transformers(source, hf_model, inputs, n_stages):
    gen = Generator(source, plan(measure_costs(source), n_stages).ranges)
    for ids in inputs:
        with torch.no_grad():
            want = hf_model(torch.tensor([ids])).logits[0]
        got = gen.logits(ids)
        err = (got - want).abs().max().item()
        assert err < ATOL, f"{n_stages} stages, {len(ids)} tokens: max |diff| {err}"
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_chunked_prefill_equals_one_shot(source):
    """Feeding a prompt in chunks through the KV cache gives the same last logits."""
    from shards.model.step import StepBatch
    gen = Generator(source, [LayerRange(0, 12), LayerRange(12, 30)])
    ids = list(range(100, 170))
    whole = gen.logits(ids)[-1]
    for start, n in [(0, 30), (30, 25), (55, 15)]:
        out = gen.step(StepBatch([99], [start], [n], tokens=torch.tensor([ids[start:start + n]])))
    gen.free(99)
    assert (out[0] - whole).abs().max().item() < ATOL
