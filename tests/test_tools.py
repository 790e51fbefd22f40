"""Tier 1: tool calls without a model: the call schema, the prompt for a template without tools,
parsing a reply into tool_calls, and the body and stream shapes OpenAI clients read."""
import asyncio
import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from serving.api import responses, tools
from serving.api.schemas import ChatCompletionRequest

pytestmark = pytest.mark.unit

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
MSG = [{"role": "user", "content": "Weather in Paris?"}]


def test_call_schema_is_one_function_or_any_of_them():
    one = tools.call_schema([WEATHER, TIME], "get_weather")
    assert one["properties"]["name"] == {"const": "get_weather"} and one["properties"]["arguments"] == WEATHER["parameters"]
    both = tools.call_schema([WEATHER, TIME])
    assert [b["properties"]["name"]["const"] for b in both["anyOf"]] == ["get_weather", "get_time"]


def test_tools_go_into_the_system_message():
    got = tools.with_tools(MSG, [WEATHER])
    assert got[0]["role"] == "system" and '"name": "get_weather"' in got[0]["content"] and got[1:] == MSG
    mine = tools.with_tools([{"role": "system", "content": "Be brief."}] + MSG, [WEATHER])
    assert mine[0]["content"].startswith("Be brief.\n\n" + tools.SYSTEM_PROMPT) and len(mine) == 2


@pytest.mark.parametrize("text,ok", [('{"name": "get_weather", "arguments": {"city": "Paris"}}', True),
                                     ('```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', True),
                                     ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', True),
                                     ('{"name": "rm_rf", "arguments": {}}', False),
                                     ("It is sunny in Paris.", False), ('{"name": "get_time", "arguments": 3}', False)])
def test_parse_call(text, ok):
    calls = tools.parse_call(text, {"get_weather", "get_time"})
    assert (calls is not None) == ok
    if ok:
        assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
        assert isinstance(json.loads(calls[0]["function"]["arguments"]), dict)


def test_request_fields_and_their_errors():
    r = ChatCompletionRequest(messages=MSG, tools=TOOLS, tool_choice="required")
    assert r.tool_mode == "required" and json.loads(r.constraint().text)["anyOf"]
    named = ChatCompletionRequest(messages=MSG, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.tool_mode == "get_time" and json.loads(named.constraint().text)["properties"]["name"]["const"] == "get_time"
    assert ChatCompletionRequest(messages=MSG, tools=TOOLS).tool_mode == "auto"
    assert ChatCompletionRequest(messages=MSG, tools=TOOLS).constraint() is None
    assert ChatCompletionRequest(messages=MSG, tools=TOOLS, tool_choice="none").tool_mode is None
    for bad, words in [(dict(tool_choice="required"), "tool_choice needs tools"),
                       (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "names function 'nope'"),
                       (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "no other output constraint"),
                       (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "pattern")]:
        with pytest.raises(ValidationError, match=words):
            ChatCompletionRequest(messages=MSG, **bad)


def test_earlier_calls_and_results_render_as_text():
    r = ChatCompletionRequest(messages=MSG + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], tools=TOOLS)
    chat = r.chat()
    assert json.loads(chat[1]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert chat[2] == {"role": "tool", "content": "sunny"}
    with pytest.raises(ValidationError, match="needs content"):
        ChatCompletionRequest(messages=[{"role": "user"}])


def delta(text, finish=None):
    return SimpleNamespace(text=text, finish_reason=finish, prompt_tokens=5, completion_tokens=3, error=None,
                           token_ids=[], logprobs=None, prompt_logprobs=None)


def stream(view, deltas):
    async def arrive():
        for d in deltas:
            yield 0, d

    async def collect():
        return [e async for e in responses.sse(arrive(), [view], "id", "m")]
    return [json.loads(e[6:]) for e in asyncio.run(collect())[:-1]]


def test_a_call_comes_as_tool_calls_in_the_body_and_the_stream():
    view = responses.View(0, True, tools=frozenset({"get_weather"}))
    ds = [delta('{"name": "get_weather", '), delta('"arguments": {"city": "Paris"}}', "stop")]
    body = responses.choice_body(view, ds)
    assert body["finish_reason"] == "tool_calls" and body["message"]["content"] is None
    assert json.loads(body["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    got = stream(view, ds)
    assert len(got) == 2 and got[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert got[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert got[1]["choices"][0]["finish_reason"] == "tool_calls" and got[1]["usage"]["completion_tokens"] == 3


def test_auto_text_flows_once_it_cannot_be_a_call():
    view = responses.View(0, True, tools=frozenset({"get_weather"}))
    got = stream(view, [delta(" "), delta(" It"), delta(" is sunny."), delta("", "stop")])
    assert [c["choices"][0]["delta"].get("content") for c in got] == [" ", " It", " is sunny.", ""]
    assert got[0]["choices"][0]["delta"]["role"] == "assistant" and got[-1]["choices"][0]["finish_reason"] == "stop"
