"""Tier 1: OpenAI bodies and SSE streams from the router's deltas (serving/api/responses.py)."""
import asyncio
import json
from types import SimpleNamespace

import pytest

from serving.api import responses
from serving.api.logprobs import TokenText

pytestmark = pytest.mark.unit


def delta(text, finish=None, completion=1, error=None, ids=(), lps=None, prompt_lps=None):
    return SimpleNamespace(text=text, finish_reason=finish, prompt_tokens=5, completion_tokens=completion, error=error,
                           token_ids=list(ids), logprobs=lps, prompt_logprobs=prompt_lps)


def events(deltas, include_usage, chat=True, views=None):
    """deltas: [(choice index, delta)] in arrival order, or a list of one choice's deltas."""
    pairs = [d if isinstance(d, tuple) else (0, d) for d in deltas]
    views = views or [responses.View(0, chat)]

    async def arrive():
        for p in pairs:
            yield p

    async def collect():
        return [e async for e in responses.sse(arrive(), views, "id1", "m", include_usage)]
    out = asyncio.run(collect())
    assert out[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in out[:-1]]


def test_include_usage_gives_null_usage_then_a_usage_chunk():
    got = events([delta("Par"), delta("is", completion=2), delta(".", "stop", 3)], include_usage=True)
    assert [c["choices"][0]["delta"].get("content") for c in got[:3]] == ["Par", "is", "."]
    assert got[0]["choices"][0]["delta"]["role"] == "assistant" and all(c["usage"] is None for c in got[:3])
    assert got[3]["choices"] == [] and got[3]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                          "total_tokens": 8}


def test_without_include_usage_the_last_chunk_carries_it():
    got = events([delta("a"), delta("b", "length", 2)], include_usage=False, chat=False)
    assert [c["choices"][0]["text"] for c in got] == ["a", "b"] and len(got) == 2
    assert "usage" not in got[0] and got[1]["usage"]["completion_tokens"] == 2
    assert got[1]["object"] == "text_completion"


def test_an_error_delta_ends_the_stream_with_an_error_chunk():
    got = events([delta("a"), delta("", "error", error="shard lost")], include_usage=True)
    assert got[-1] == {"error": {"message": "shard lost", "type": "service_unavailable"}} and len(got) == 2


def test_completion_body_has_usage():
    body = responses.completion_body("id1", "m", [responses.View(0, True)], [[delta("Paris."), delta("", "stop", 3)]])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert body["usage"]["total_tokens"] == 8 and body["object"] == "chat.completion"
    assert body["choices"][0]["logprobs"] is None


TEXTS = {1: "A", 2: "b", 3: " c", 7: "d"}
TEXT = TokenText(lambda ids: "".join(TEXTS[i] for i in ids))


def test_legacy_logprobs_with_echo_put_the_prompt_first_with_a_null_first_token():
    """Completions' shape as lm-eval reads it: token_logprobs[ctxlen:-1] are the continuation's."""
    view = responses.View(0, False, TEXT, echo="Ab", prompt_ids=[1, 2])
    prompt = [None, [-0.5, [[7, -0.1]]]]
    ds = [delta(" c", ids=[3], lps=[[-1.5, [[3, -1.5]]]], prompt_lps=prompt), delta("d", "length", 2, ids=[7],
                                                                                   lps=[[-0.2, [[7, -0.2]]]])]
    lp = responses.completion_body("id1", "m", [view], [ds])["choices"][0]["logprobs"]
    assert lp["tokens"] == ["A", "b", " c", "d"] and lp["text_offset"] == [0, 1, 2, 4]
    assert lp["token_logprobs"] == [None, -0.5, -1.5, -0.2]
    assert lp["top_logprobs"] == [None, {"d": -0.1}, {" c": -1.5}, {"d": -0.2}]
    body = responses.completion_body("id1", "m", [view], [ds])
    assert body["choices"][0]["text"] == "Ab cd"


def test_max_tokens_zero_with_echo_shows_the_prompt_only():
    view = responses.View(0, False, TEXT, echo="Ab", prompt_ids=[1, 2], drop=True)
    body = responses.completion_body("id1", "m", [view], [[delta(" c", "length", 1, ids=[3], lps=[[-1.0, []]],
                                                                 prompt_lps=[None, [-0.5, []]])]])
    assert body["choices"][0]["text"] == "Ab" and body["choices"][0]["logprobs"]["token_logprobs"] == [None, -0.5]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}


def test_chat_logprobs_shape_and_streamed_chunks():
    view = responses.View(0, True, TEXT)
    d1 = delta(" c", ids=[3], lps=[[-1.5, [[3, -1.5], [7, -2.0]]]])
    d2 = delta("d", "stop", 2, ids=[7], lps=[[-0.2, []]])
    body = responses.completion_body("id1", "m", [view], [[d1, d2]])
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": " c", "logprob": -1.5, "bytes": [32, 99],
                          "top_logprobs": [{"token": " c", "logprob": -1.5, "bytes": [32, 99]},
                                           {"token": "d", "logprob": -2.0, "bytes": [100]}]}
    assert [c["token"] for c in content] == [" c", "d"]
    got = events([d1, d2], include_usage=False, views=[view])
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in got] == [" c", "d"]


def test_choices_interleave_and_usage_counts_a_shared_prompt_once():
    views = [responses.View(i, False, prompt_ids=[1, 2]) for i in range(2)]
    got = events([(1, delta("x")), (0, delta("y")), (1, delta("z", "stop", 2)), (0, delta("w", "length", 2))],
                 include_usage=True, views=views)
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in got[:4]] == [(1, "x"), (0, "y"), (1, "z"),
                                                                                     (0, "w")]
    assert got[4]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_streamed_echo_sends_the_prompt_first_then_offsets_continue():
    view = responses.View(0, False, TEXT, echo="Ab", prompt_ids=[1, 2])
    got = events([delta(" c", ids=[3], lps=[[-1.5, []]], prompt_lps=[None, [-0.5, []]]),
                  delta("d", "stop", 2, ids=[7], lps=[[-0.2, []]])], include_usage=False, views=[view])
    assert [c["choices"][0]["text"] for c in got] == ["Ab", " c", "d"]
    assert got[0]["choices"][0]["logprobs"]["token_logprobs"] == [None, -0.5]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in got[1:]] == [[2], [4]]
    assert got[-1]["choices"][0]["finish_reason"] == "stop" and got[-1]["usage"]["completion_tokens"] == 2
