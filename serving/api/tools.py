"""Tool calls: OpenAI's `tools` and `tool_choice` on chat completions (docs/design.md, "Tool
calls"). Pure: no Serve, no tokenizer.

A call is written as one JSON object, `{"name": ..., "arguments": {...}}`. A model whose chat
template renders `tools` gets them through it; the others (the default model's has no tools
section) get them in the system message, with that format (SYSTEM_PROMPT). With `tool_choice`
`required` or a named function the reply is constrained to a call whose arguments validate
against the function's schema; with `auto` the reply is parsed, and a call found becomes
`tool_calls`; with `none` no tools are shown.
"""
from __future__ import annotations

import json
import re
import uuid

SYSTEM_PROMPT = ("You can call functions. To call one, reply with only a JSON object of the form "
                 '{"name": <function name>, "arguments": <object of arguments>} and nothing else. '
                 "The functions, as JSON:\n")
_FENCE = re.compile(r"^\s*(?:```(?:json)?|<tool_call>)\s*(.*?)\s*(?:```|</tool_call>)?\s*$", re.S)


def call_schema(functions: list[dict], name: str | None = None) -> dict:
    """The JSON schema of a reply that calls one of `functions` (OpenAI `function` objects), or
    the one named."""
    def one(f: dict) -> dict:
        return {"type": "object", "properties": {"name": {"const": f["name"]},
                                                 "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}
    picked = [f for f in functions if name is None or f["name"] == name]
    return one(picked[0]) if len(picked) == 1 else {"anyOf": [one(f) for f in picked]}


def system_text(functions: list[dict]) -> str:
    listed = [{"name": f["name"], "description": f.get("description", ""),
               "parameters": f.get("parameters") or {"type": "object"}} for f in functions]
    return SYSTEM_PROMPT + "\n".join(json.dumps(f) for f in listed)


def with_tools(messages: list[dict], functions: list[dict]) -> list[dict]:
    """Chat messages for a template without a tools section: the tools in the system message
    (added, or appended to the caller's)."""
    text = system_text(functions)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def call_text(calls: list[dict]) -> str:
    """An assistant message's earlier `tool_calls` as the model would have written them."""
    return "\n".join(json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}) for c in calls)


def _arguments(call: dict):
    args = call["function"].get("arguments") or "{}"
    try:
        return json.loads(args) if isinstance(args, str) else args
    except ValueError:
        return args


def parse_call(text: str, names: set[str]) -> list[dict] | None:
    """The reply as OpenAI `tool_calls` when it is a call of one of `names` (fenced or in
    <tool_call> tags too), else None."""
    m = _FENCE.match(text)
    body = m.group(1) if m else text.strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments", {}), dict):
        return None
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}))}}]


def may_be_call(text: str) -> bool:
    """Whether a reply that begins with `text` could still turn out to be a call (so a stream
    holds it back): it is blank so far, or opens a JSON object, a fence or a <tool_call> tag."""
    head = text.lstrip()
    return not head or head[0] == "{" or "```".startswith(head[:3]) or "<tool_call>".startswith(head[:11])
