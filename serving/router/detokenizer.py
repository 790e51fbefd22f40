"""A request's text, token by token: incremental detokenization and stop strings.

Detokenizes a window from the last emitted point, as vLLM does, never the whole reply per
token. Text that could still become a stop string is held back until it cannot, so no partial
stop string is ever sent; a stop string found ends the reply there, also on its last token.
Pure: a tokenizer with `decode(ids, skip_special_tokens=True)` is all it needs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    text: str                  # new text to send
    token_ids: list[int]       # new token ids to send
    stopped: bool              # a stop string ended the reply: finish it as "stop"


@dataclass
class Detokenizer:
    tokenizer: object
    stop: tuple[str, ...] = ()
    text: str = ""             # text sent so far
    held: str = ""             # decoded, not sent: could still be the start of a stop string
    sent: int = 0              # generated tokens sent so far
    prefix_at: int = 0         # detokenization window: decode from here ...
    read_at: int = 0           # ... text up to here was already sent

    def step(self, generated: list[int], finished: bool) -> Piece | None:
        """What to send after `generated` grew (finished: its last token is in). None while a
        multi-byte character is half decoded."""
        decode = self.tokenizer.decode
        before = decode(generated[self.prefix_at:self.read_at], skip_special_tokens=True)
        window = decode(generated[self.prefix_at:], skip_special_tokens=True)
        if window.endswith("\ufffd") and not finished:
            return None
        text = self.text + self.held + window[len(before):]     # everything decoded so far
        cut, stopped = len(text), False                          # send up to cut
        if self.stop:
            # search only where a stop string could newly appear: the tail of the sent text + new
            tail = max(0, len(self.text) - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(x, tail) for x in self.stop) if i >= 0]
            if hits:
                cut, stopped = min(hits), True
            elif not finished:
                cut = len(text) - stop_prefix_len(text, self.stop)
        done = finished or stopped
        self.prefix_at, self.read_at = self.read_at, len(generated)
        new, self.held = text[len(self.text):cut], ("" if done else text[cut:])
        self.text += new
        ids, self.sent = generated[self.sent:], len(generated)
        return Piece(new, ids, stopped)


def stop_prefix_len(text: str, stops) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(x.startswith(text[-n:]) for x in stops):
            return n
    return 0
