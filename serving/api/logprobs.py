"""Log-probability entries (shards/model/logprobs.py: [logprob, [[id, logprob], ...]]) in the
two shapes OpenAI clients read. Pure: token text comes from a function of the id.

- chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, the
  alternatives a {token text: logprob} map, None for the first prompt token (nothing predicts it).
"""
from __future__ import annotations

from collections.abc import Callable


class TokenText:
    """A token id's text as it reads alone (the tokenizer's decode of that one id), cached:
    an evaluation asks for the same few thousand ids over and over."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.cache = decode, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.decode([token_id])
        return text


def chat_content(ids: list[int], entries: list, text: TokenText) -> dict:
    """OpenAI's chat `logprobs` object for generated tokens `ids` and their entries."""
    def one(token_id: int, logprob: float) -> dict:
        t = text(token_id)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}
    content = []
    for token_id, entry in zip(ids, entries):
        item = one(token_id, entry[0])
        item["top_logprobs"] = [one(i, lp) for i, lp in entry[1]]
        content.append(item)
    return {"content": content}


class Legacy:
    """Builds completions' `logprobs` objects chunk by chunk; text_offset counts characters
    from the start of the choice's text (the prompt's, with echo)."""

    def __init__(self, text: TokenText, offset: int = 0):
        self.text, self.offset = text, offset

    def block(self, ids: list[int], entries: list) -> dict:
        """The object for tokens `ids` (entries[i] None: no logprob, as the first prompt token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(ids, entries):
            t = self.text(token_id)
            out["tokens"].append(t)
            out["text_offset"].append(self.offset)
            self.offset += len(t)
            out["token_logprobs"].append(None if entry is None else entry[0])
            out["top_logprobs"].append(None if entry is None else self._top(entry[1]))
        return out

    def _top(self, alternatives: list) -> dict:
        top: dict = {}
        for i, lp in alternatives:      # most likely first: it keeps a text two tokens share
            top.setdefault(self.text(i), lp)
        return top


def merge(a: dict | None, b: dict) -> dict:
    """Two consecutive legacy blocks as one."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}
