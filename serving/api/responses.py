"""OpenAI response bodies and server-sent event streams, from the router's deltas.

A delta (serving/router/engine.py) carries the text since the last one, `finish_reason` on the
last, and the prompt and completion token counts. Pure: no Serve, no Ray.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable


def usage(d) -> dict:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens}


def completion_body(rid: str, chat: bool, model: str, text: str, last) -> dict:
    """A whole (non-streamed) chat.completion or text_completion."""
    choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(last)}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def error_event(message: str) -> str:
    """OpenAI streams an error as a final chunk of its own."""
    return _event({"error": {"message": message, "type": "service_unavailable"}})


def chunk(rid: str, chat: bool, model: str, d, first: bool, include_usage: bool) -> str:
    """One streamed chunk. With include_usage every chunk carries `usage: null` and the counts
    come in a last chunk of their own (OpenAI's stream_options); without, on the final chunk."""
    piece = {"role": "assistant", "content": d.text} if first else {"content": d.text}
    choice = {"index": 0, "finish_reason": d.finish_reason, "logprobs": None}
    choice.update({"delta": piece} if chat else {"text": d.text})
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    elif d.finish_reason:
        body["usage"] = usage(d)
    return _event(body)


async def sse(first, following: Callable[[], Awaitable], rid: str, chat: bool, model: str,
              include_usage: bool = False) -> AsyncIterator[str]:
    """The events of one streamed response, from its first delta and `following()` for each
    next one, through `data: [DONE]`. A delta that ends in error becomes an error chunk."""
    d, is_first = first, True
    while True:
        if d.finish_reason == "error":
            yield error_event(d.error)
            break
        yield chunk(rid, chat, model, d, is_first, include_usage)
        if d.finish_reason:
            if include_usage:
                yield _event({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                              "created": int(time.time()), "model": model, "choices": [], "usage": usage(d)})
            break
        d, is_first = await following(), False
    yield "data: [DONE]\n\n"
