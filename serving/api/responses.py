"""OpenAI response bodies and server-sent event streams, from the router's deltas.

A delta (serving/router/engine.py) carries the text since the last one, its token ids and
(when asked) their log probabilities, `finish_reason` on the last, and the prompt and completion
token counts. A response has one choice per prompt and per `n`; each choice is a `View` over its
deltas. Pure: no Serve, no Ray.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serving.api import tools
from serving.api.logprobs import Legacy, TokenText, chat_content, merge


@dataclass
class View:
    """How one choice reads: chat or completion, with or without log probabilities; `echo`
    is the prompt's text to put first (completions' echo), `prompt_ids` its tokens; `drop`:
    the generated token is not shown (max_tokens 0 with echo)."""

    index: int
    chat: bool
    text: TokenText | None = None       # set: log probabilities asked
    echo: str | None = None
    prompt_ids: list[int] = field(default_factory=list)
    drop: bool = False
    prompt: int = 0                     # which prompt of the request it answers (n choices share one)
    tools: frozenset[str] = frozenset()  # functions a reply may call (serving/api/tools.py)
    forced: bool = False                # tool_choice required or named: the reply is a call
    legacy: Legacy | None = None

    def __post_init__(self):
        if self.text is not None and not self.chat:
            self.legacy = Legacy(self.text)

    def prompt_part(self, d) -> tuple[str, dict | None]:
        """The echoed prompt: its text, and its log probabilities from the first delta."""
        if self.legacy is None:
            return self.echo, None
        entries = d.prompt_logprobs or [None] * len(self.prompt_ids)
        return self.echo, self.legacy.block(self.prompt_ids, entries)

    def part(self, d) -> tuple[str, dict | None]:
        """A delta's generated text and log probabilities ('' and None where dropped)."""
        if self.drop:
            return "", None
        if self.text is None:
            return d.text, None
        if self.chat:
            return d.text, chat_content(d.token_ids, d.logprobs or [], self.text)
        return d.text, self.legacy.block(d.token_ids, d.logprobs or [])

    def calls(self, text: str, finish: str | None) -> list | None:
        """The reply as tool_calls, when it may call tools, ended on its own, and is a call."""
        if not self.tools or finish != "stop":
            return None
        return tools.parse_call(text, set(self.tools))

    def holds(self, text: str) -> bool:
        """A stream keeps a reply that begins with `text` back: it may still be a call."""
        return bool(self.tools) and (self.forced or tools.may_be_call(text))

    def completion_tokens(self, d) -> int:
        return 0 if self.drop else d.completion_tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def total_usage(views: list[View], lasts: list) -> dict:
    """Each distinct prompt's tokens once (n choices share one), every choice's completion."""
    prompts = {}
    for v, d in zip(views, lasts):
        prompts.setdefault(v.prompt, d.prompt_tokens)
    return usage(sum(prompts.values()), sum(v.completion_tokens(d) for v, d in zip(views, lasts)))


def choice_body(view: View, deltas: list) -> dict:
    """One whole (non-streamed) choice from all its deltas."""
    texts, legacy, content = [], None, []
    if view.echo is not None:
        text, legacy = view.prompt_part(deltas[0])
        texts.append(text)
    for d in deltas:
        text, lp = view.part(d)
        texts.append(text)
        if lp is not None and view.chat:
            content += lp["content"]
        elif lp is not None:
            legacy = merge(legacy, lp)
    lps = ({"content": content} if view.text is not None else None) if view.chat else legacy
    choice = {"index": view.index, "finish_reason": deltas[-1].finish_reason, "logprobs": lps}
    calls = view.calls("".join(texts), deltas[-1].finish_reason)
    if calls:
        choice.update(message={"role": "assistant", "content": None, "tool_calls": calls}, finish_reason="tool_calls")
    elif view.chat:
        choice["message"] = {"role": "assistant", "content": "".join(texts)}
    else:
        choice["text"] = "".join(texts)
    return choice


def completion_body(rid: str, model: str, views: list[View], deltas: list[list]) -> dict:
    """A whole (non-streamed) chat.completion or text_completion."""
    chat = views[0].chat
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice_body(v, ds) for v, ds in zip(views, deltas)],
            "usage": total_usage(views, [ds[-1] for ds in deltas])}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def error_event(message: str) -> str:
    """OpenAI streams an error as a final chunk of its own."""
    return _event({"error": {"message": message, "type": "service_unavailable"}})


def chunk(rid: str, model: str, view: View, text: str, lps, finish: str | None, first: bool) -> dict:
    """One streamed chunk of one choice."""
    choice = {"index": view.index, "finish_reason": finish, "logprobs": lps}
    if view.chat:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion.chunk" if view.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


async def sse(events: AsyncIterator, views: list[View], rid: str, model: str,
              include_usage: bool = False) -> AsyncIterator[str]:
    """The events of one streamed response, from (choice index, delta) pairs in arrival order,
    through `data: [DONE]`. With include_usage every chunk carries `usage: null` and the counts
    come in a last chunk of their own (OpenAI's stream_options); without, on each choice's final
    chunk. A delta that ends in error becomes an error chunk and ends the stream. A reply that
    may be a tool call is held back until it cannot be, or ends: then comes as tool_calls."""
    lasts: dict[int, object] = {}
    held: dict[int, list] = {}
    flowing: set[int] = set()             # choices whose text streams as it comes
    async for i, d in events:
        view = views[i]
        if d.finish_reason == "error":
            yield error_event(d.error)
            break
        if view.tools and i not in flowing:
            held.setdefault(i, []).append(d)
            text = "".join(x.text for x in held[i])
            if not d.finish_reason and view.holds(text):
                continue
            calls = view.calls(text, d.finish_reason)
            if calls:
                lasts[i] = d
                for body in _call_chunks(rid, model, view, calls, d, include_usage):
                    yield body
            else:
                flowing.add(i)
                for x in held.pop(i):
                    for event in _chunks(rid, model, view, x, i not in lasts, include_usage):
                        yield event
                    lasts[i] = x
        else:
            for event in _chunks(rid, model, view, d, i not in lasts, include_usage):
                yield event
            lasts[i] = d
        if len(lasts) == len(views) and all(x.finish_reason for x in lasts.values()):
            if include_usage:
                yield _event({"id": rid, "object": "chat.completion.chunk" if view.chat else "text_completion",
                              "created": int(time.time()), "model": model, "choices": [],
                              "usage": total_usage(views, [lasts[v.index] for v in views])})
            break
    yield "data: [DONE]\n\n"


def _chunks(rid: str, model: str, view: View, d, first: bool, include_usage: bool) -> list[str]:
    """A delta's chunks: the echoed prompt before a choice's first, then its text."""
    out = []
    if first and view.echo is not None:
        text, lps = view.prompt_part(d)
        out.append(_with_usage(chunk(rid, model, view, text, lps, None, True), include_usage, None))
        first = False
    text, lps = view.part(d)
    final = d.finish_reason and usage(d.prompt_tokens, view.completion_tokens(d))
    out.append(_with_usage(chunk(rid, model, view, text, lps, d.finish_reason, first), include_usage, final))
    return out


def _call_chunks(rid: str, model: str, view: View, calls: list, d, include_usage: bool) -> list[str]:
    """A reply that is a call, as OpenAI streams one: the role with the call (its whole
    arguments in one piece), then an empty delta with finish_reason tool_calls."""
    body = chunk(rid, model, view, "", None, None, True)
    body["choices"][0]["delta"] = {"role": "assistant", "content": None,
                                   "tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
    end = chunk(rid, model, view, "", None, "tool_calls", False)
    end["choices"][0]["delta"] = {}
    final = usage(d.prompt_tokens, view.completion_tokens(d))
    return [_with_usage(body, include_usage, None), _with_usage(end, include_usage, final)]


def _with_usage(body: dict, include_usage: bool, final: dict | None) -> str:
    if include_usage:
        body["usage"] = None
    elif final:
        body["usage"] = final
    return _event(body)
