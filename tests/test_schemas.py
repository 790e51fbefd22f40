"""OpenAI request validation and mapping to SamplingParams (pure)."""
import pytest
from pydantic import ValidationError

from serving.api.schemas import ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.unit

MSG = [{"role": "user", "content": "hi"}]


def test_defaults_and_mapping():
    p = ChatCompletionRequest(messages=MSG, temperature=0, max_completion_tokens=7, stop="x", seed=3).sampling()
    assert (p.temperature, p.max_tokens, p.stop, p.seed) == (0, 7, ("x",), 3)
    assert CompletionRequest(prompt="a").sampling(default_max=99).max_tokens == 99


@pytest.mark.parametrize("bad", [{"temperature": 3}, {"top_p": 0}, {"max_tokens": 0}, {"n": 9},
                                 {"stop": ["a", "b", "c", "d", "e"]}, {"messages": []}])
def test_refused(bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**{"messages": MSG, **bad})


def test_text_parts_joined_other_parts_refused():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hel"},
                                                                        {"type": "text", "text": "lo"}]}])
    assert body.chat() == [{"role": "user", "content": "hello"}]
    with pytest.raises(ValidationError, match="image_url"):
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


@pytest.mark.parametrize("field,value", [("functions", [{"name": "f"}]), ("best_of", 3),
                                         ("suffix", "x"), ("logit_bias", {"1": 2}),
                                         ("presence_penalty", 0.5)])
def test_unsupported_fields_refused_by_name(field, value):
    with pytest.raises(ValidationError, match=f"field '{field}' is not supported"):
        ChatCompletionRequest(messages=MSG, **{field: value})


def test_defaults_of_unsupported_fields_and_bookkeeping_fields_accepted():
    ChatCompletionRequest(messages=MSG, logprobs=False, presence_penalty=0, user="u", metadata={"x": 1})
    with pytest.raises(ValidationError, match="unknown field 'temprature'"):
        ChatCompletionRequest(messages=MSG, temprature=0)


def test_stream_options():
    assert ChatCompletionRequest(messages=MSG, stream=True, stream_options={"include_usage": True}).include_usage
    assert not ChatCompletionRequest(messages=MSG, stream=True).include_usage
    with pytest.raises(ValidationError, match="only allowed with stream: true"):
        ChatCompletionRequest(messages=MSG, stream_options={"include_usage": True})
    with pytest.raises(ValidationError, match="include_usag"):
        ChatCompletionRequest(messages=MSG, stream=True, stream_options={"include_usag": True})


def test_tokenize_and_detokenize_bodies():
    from serving.api.schemas import DetokenizeRequest, TokenizeRequest
    assert TokenizeRequest(prompt="hi").add_special_tokens and TokenizeRequest(messages=MSG).chat()[0]["role"] == "user"
    for bad in ({}, {"prompt": "a", "messages": MSG}):
        with pytest.raises(ValidationError, match="exactly one of prompt and messages"):
            TokenizeRequest(**bad)
    with pytest.raises(ValidationError):
        TokenizeRequest(prompt="a", add_special_token=False)        # misspelt: refused, not ignored
    assert DetokenizeRequest(tokens=[1, 2]).tokens == [1, 2]
    with pytest.raises(ValidationError):
        DetokenizeRequest(tokens=[-1])


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"stop": [""]}, {"stop": "x" * 300},
                                 {"seed": 2**64}, {"top_k": -1}, {"max_tokens": 5000}])
def test_more_refused(bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**{"messages": MSG, **bad})


def test_logprob_fields_and_their_invalid_combinations():
    chat = ChatCompletionRequest(messages=MSG, logprobs=True, top_logprobs=5)
    assert (chat.sampling().logprobs, chat.sampling().prompt_logprobs) == (5, None)
    assert ChatCompletionRequest(messages=MSG, logprobs=True).sampling().logprobs == 0
    assert ChatCompletionRequest(messages=MSG).sampling().logprobs is None
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest(messages=MSG, top_logprobs=2)
    with pytest.raises(ValidationError, match="less than or equal to 20"):
        ChatCompletionRequest(messages=MSG, logprobs=True, top_logprobs=21)
    echo = CompletionRequest(prompt="a", echo=True, logprobs=1, max_tokens=0)
    assert (echo.sampling().max_tokens, echo.sampling().logprobs, echo.sampling().prompt_logprobs) == (1, 1, 1)
    assert CompletionRequest(prompt="a", logprobs=1).sampling().prompt_logprobs is None   # no echo: no prompt scores
    with pytest.raises(ValidationError, match="max_tokens 0 needs echo"):
        CompletionRequest(prompt="a", max_tokens=0)


@pytest.mark.parametrize("prompt,want", [("a b", ["a b"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]),
                                         ([[1], [2, 3]], [[1], [2, 3]])])
def test_completion_prompt_forms(prompt, want):
    assert CompletionRequest(prompt=prompt).prompts() == want


@pytest.mark.parametrize("prompt", [[], ["a"] * 65, [-1], [["a"]], ["a", [1]]])
def test_bad_prompts_are_refused(prompt):
    with pytest.raises(ValidationError):
        CompletionRequest(prompt=prompt)


def test_n_choices_get_their_own_seeds_reproducibly():
    body = ChatCompletionRequest(messages=MSG, n=3, seed=11, temperature=0.8)
    seeds = [body.choice_sampling(j).seed for j in range(3)]
    assert seeds[0] == 11 and len(set(seeds)) == 3
    assert seeds == [ChatCompletionRequest(messages=MSG, n=3, seed=11).choice_sampling(j).seed for j in range(3)]
    assert ChatCompletionRequest(messages=MSG, n=2).choice_sampling(1).seed is None
    with pytest.raises(ValidationError, match="over 64 choices"):
        CompletionRequest(prompt=["a"] * 9, n=8)
