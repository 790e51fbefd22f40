"""Constrained decoding: a request's JSON schema, regex, grammar or choice list as a token
mask per step (docs/design.md, "Structured output").

The router keeps each constrained sequence's matcher (xgrammar: on this model's vocabulary a
token's mask takes 1.6 us at the median against llguidance's 11.5, bench/grammar_engines.py).
Before a step that samples for the sequence it fills the sequence's bitmask; the last shard
applies it to the logits before it samples; the sampled token then advances the matcher here.
So the state lives where the token history does: a recomputed, moved or re-placed shard
needs nothing.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np

from shards.errors import ShardServeError

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
SEPARATORS = (", ", ": ")    # compact JSON: a free-whitespace grammar lets a small model pad forever


class GrammarError(ShardServeError):
    """A constraint that does not compile; the message says why (a 400)."""


@dataclass(frozen=True)
class Constraint:
    """What a request constrains its output to. `text`: the schema as JSON, the regex, the
    EBNF grammar, or the choices as a JSON list; `strict`: a schema's objects take no
    properties it does not name."""

    kind: str
    text: str = ""
    strict: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {KINDS}, not {self.kind!r}")


class Grammars:
    """Compiles constraints for one model's tokenizer (xgrammar caches compiled grammars)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        import xgrammar as xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self._lock = threading.Lock()     # compiled in the API's tokenizer thread, used on the loop

    def compile(self, c: Constraint):
        """The compiled grammar, or GrammarError naming the reason."""
        try:
            with self._lock:
                return self._compile(c)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"the {c.kind} constraint does not compile: {str(e).strip()[:500]}") from e

    def _compile(self, c: Constraint):
        cc = self._compiler
        if c.kind == "json_object":        # any object, compact like the schemas'
            return cc.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=SEPARATORS,
                                          strict_mode=False)
        if c.kind == "json_schema":
            return cc.compile_json_schema(c.text, any_whitespace=False, separators=SEPARATORS, strict_mode=c.strict)
        if c.kind == "regex":
            return cc.compile_regex(c.text)
        if c.kind == "choice":
            return cc.compile_regex("|".join(_escape(x) for x in json.loads(c.text)))
        return cc.compile_grammar(c.text)

    def matcher(self, compiled) -> "Matcher":
        return Matcher(compiled, self.vocab_size)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr
        self._m = xgr.GrammarMatcher(compiled)
        self._mask = xgr.allocate_token_bitmask(1, vocab_size)   # int32 [1, ceil(vocab / 32)]

    def mask(self) -> np.ndarray:
        """The tokens allowed next, as bits: int32 [ceil(vocab / 32)], bit t % 32 of word t // 32."""
        self._m.fill_next_token_bitmask(self._mask)
        return self._mask[0].numpy().copy()

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar refuses it."""
        return self._m.accept_token(token)

    @property
    def done(self) -> bool:
        return self._m.is_terminated()


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in r".^$*+?()[]{}|\/" else ch for ch in text)
