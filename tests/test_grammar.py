"""Structured output's parts: the mask as the last shard applies it (unit), as the step channel
carries it (unit), and the router's matchers on the served model's vocabulary (model)."""
import json

import numpy as np
import pytest
import torch

from serving.router.grammar import Constraint, GrammarError, Grammars
from shards.model.sampling import allow_only, sample
from shards.model.step import SamplingParams, StepBatch
from shards.runtime.channel import decode_step, encode_step


def bits(allowed: list[int], vocab: int) -> np.ndarray:
    m = np.zeros((vocab + 31) // 32, dtype=np.uint32)
    for t in allowed:
        m[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    return m.view(np.int32)


@pytest.mark.unit
def test_masked_rows_sample_only_allowed_tokens_and_others_are_untouched():
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    masks = [bits([5, 63, 64], 70), None, bits([69], 70)]      # bit 31 of a word: the int32 sign bit
    out = allow_only(logits, masks)
    assert torch.equal(out[1], logits[1])
    assert set(torch.nonzero(out[0] > -float("inf")).flatten().tolist()) == {5, 63, 64}
    assert set(torch.nonzero(out[2] > -float("inf")).flatten().tolist()) == {69}
    hot = [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    for step in range(20):
        got = sample(out, hot, [step] * 3).tolist()
        assert got[0] in {5, 63, 64} and got[2] == 69
    assert allow_only(logits, [None, None, None]) is logits


@pytest.mark.unit
def test_masks_cross_the_wire_bit_exact():
    m = bits([0, 31, 32, 100], 128)
    b = StepBatch([1, 2], [0, 0], [1, 1], tokens=np.zeros((2, 1), np.int64),
                  sampling=[SamplingParams(), SamplingParams()], masks=[m, None])
    header, body = encode_step(b)
    got = decode_step(header, bytearray(body))
    assert np.array_equal(got.masks[0], m) and got.masks[1] is None


@pytest.fixture(scope="module")
def grammars(source, tokenizer):
    return Grammars(tokenizer, source.config.vocab_size, {tokenizer.eos_token_id})


def walk(grammars, constraint, text, tokenizer) -> bool:
    """Whether each token of text was allowed by the mask before it and the matcher ends done."""
    m = grammars.matcher(grammars.compile(constraint))
    for t in tokenizer.encode(text) + [tokenizer.eos_token_id]:
        mask = m.mask()
        if not (int(mask[t // 32]) >> (t % 32)) & 1 or not m.accept(t):
            return False
    return m.done


@pytest.mark.model
def test_json_schema_regex_choice_and_grammar_accept_what_they_describe(grammars, tokenizer):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["city", "n"]}
    js = Constraint("json_schema", json.dumps(schema))
    assert walk(grammars, js, '{"city": "Paris", "n": 3}', tokenizer)
    assert not walk(grammars, js, '{"city": "Paris"}', tokenizer)                # n is required
    assert not walk(grammars, js, '{"city": "Paris", "n": 3, "x": 1}', tokenizer)  # strict: no other keys
    assert walk(grammars, Constraint("json_schema", json.dumps(schema), strict=False),
                '{"city": "Paris", "n": 3, "x": 1}', tokenizer)
    assert walk(grammars, Constraint("json_object"), '{"a": [1, 2]}', tokenizer)
    assert walk(grammars, Constraint("regex", r"[0-9]{3}-[a-z]+"), "123-abc", tokenizer)
    assert not walk(grammars, Constraint("regex", r"[0-9]{3}-[a-z]+"), "12-abc", tokenizer)
    assert walk(grammars, Constraint("choice", json.dumps(["yes (sure)", "no"])), "yes (sure)", tokenizer)
    assert not walk(grammars, Constraint("choice", json.dumps(["yes", "no"])), "maybe", tokenizer)
    assert walk(grammars, Constraint("grammar", 'root ::= "a" ("b" | "c")*'), "abcb", tokenizer)


@pytest.mark.model
@pytest.mark.parametrize("constraint,words", [
    (Constraint("json_schema", '{"type": "object", "properties": {"a": {"type": "nonsense"}}}'), "json_schema"),
    (Constraint("json_schema", "{not json"), "json_schema"),
    (Constraint("regex", "(unclosed"), "regex"),
    (Constraint("grammar", "root ::= missing_rule"), "grammar")])
def test_a_constraint_that_does_not_compile_names_why(grammars, constraint, words):
    with pytest.raises(GrammarError, match=f"the {words} constraint does not compile: .+"):
        grammars.compile(constraint)
