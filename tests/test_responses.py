"""Tier 1: OpenAI bodies and SSE streams from the router's deltas (serving/api/responses.py)."""
import asyncio
import json
from types import SimpleNamespace

import pytest

from serving.api import responses

pytestmark = pytest.mark.unit


def delta(text, finish=None, completion=1, error=None):
    return SimpleNamespace(text=text, finish_reason=finish, prompt_tokens=5, completion_tokens=completion, error=error)


def events(deltas, include_usage, chat=True):
    rest = iter(deltas[1:])

    async def following():
        return next(rest)

    async def collect():
        return [e async for e in responses.sse(deltas[0], following, "id1", chat, "m", include_usage)]
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
    body = responses.completion_body("id1", True, "m", "Paris.", delta("", "stop", 3))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert body["usage"]["total_tokens"] == 8 and body["object"] == "chat.completion"
