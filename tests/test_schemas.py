"""OpenAI request validation and mapping to SamplingParams (pure)."""
import pytest
from pydantic import ValidationError

from serving.schemas import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def test_defaults_and_mapping():
    p = ChatCompletionRequest(messages=MSG, temperature=0, max_completion_tokens=7, stop="x", seed=3).sampling()
    assert (p.temperature, p.max_tokens, p.stop, p.seed) == (0, 7, ("x",), 3)
    assert CompletionRequest(prompt="a").sampling(default_max=99).max_tokens == 99


@pytest.mark.parametrize("bad", [{"temperature": 3}, {"top_p": 0}, {"max_tokens": 0}, {"n": 2},
                                 {"stop": ["a", "b", "c", "d", "e"]}, {"messages": []}])
def test_refused(bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**{"messages": MSG, **bad})
