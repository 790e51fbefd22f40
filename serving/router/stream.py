"""A request's stream as the router serves it: what it yields (Delta), the router's state for
it (RequestStream), and the refusals a request can meet. Pure: no Ray."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from serving.router.detokenizer import Detokenizer
from serving.router.scheduler import Sequence


@dataclass
class Delta:
    """What a request's stream yields: new text and token ids; finish_reason on the last."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None    # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None            # with finish_reason "error": why
    # when the request asked (SamplingParams.logprobs / prompt_logprobs): an entry per token of
    # token_ids (shards/model/logprobs.py), and, on the first delta, one per prompt token
    logprobs: list | None = None
    prompt_logprobs: list | None = None


class Overloaded(RuntimeError):
    """The waiting queue is full (HTTP 429): try again shortly."""


class RequestTimeout(RuntimeError):
    """A request ran past its deadline; it was aborted and its KV freed."""


@dataclass
class RequestStream:
    """A request as the router holds it: its sequence, its detokenizer, the queue its deltas
    go to, and when its tokens came (for the latency series)."""

    seq: Sequence
    detok: Detokenizer
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    first: bool = True          # no delta sent yet: the prompt's log probabilities go with the first
    started: float = field(default_factory=time.perf_counter)
    last: float | None = None   # when its last tokens were pushed (perf_counter)


class PipelineDown(RuntimeError):
    """The pipeline cannot serve (a shard could not be re-placed); says why."""
