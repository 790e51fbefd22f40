"""What one forward call through the pipeline carries (docs/design.md, "Pipeline")."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_MAX_TOKENS = 256     # a request that names no max_tokens (the API's and the engine's default)
MAX_LOGPROBS = 20            # alternatives per position, as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0          # 0: no top-k cut
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    # log probabilities of the model's distribution (before temperature, top-k, top-p): None
    # for none, else the chosen token's and this many alternatives' (0 .. MAX_LOGPROBS)
    logprobs: int | None = None
    prompt_logprobs: int | None = None     # the same for each prompt token after the first

    def __post_init__(self) -> None:
        # written so that NaN fails every check
        if not (0 <= self.temperature <= 100 and 0 < self.top_p <= 1 and self.top_k >= 0 and self.max_tokens >= 1):
            raise ValueError(
                f"bad sampling params: temperature {self.temperature} [0, 100], top_p {self.top_p} "
                f"(0, 1], top_k {self.top_k} (>= 0), max_tokens {self.max_tokens} (>= 1)")
        if any(not x for x in self.stop):
            raise ValueError("stop strings must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be 0 to {MAX_LOGPROBS}, got {k}")


@dataclass
class StepBatch:
    """One micro-batch group's step through every stage.

    Sequence b contributes q_lens[b] new tokens at positions starts[b] .. starts[b] + q_lens[b] - 1
    (starts[b] = tokens already in its KV cache). Inputs are right-padded to Q = max(q_lens).
    """

    seq_ids: list[int]
    starts: list[int]
    q_lens: list[int]
    tokens: object = None            # first stage: int64 [B, Q] token ids
    hidden: object = None            # later stages: float [B, Q, hidden_size]
    sampling: list[SamplingParams] = field(default_factory=list)  # last stage samples with these
    steps: list[int] = field(default_factory=list)  # tokens generated so far per sequence (seeding)
    # sequences whose KV each shard drops before this step. Riding on the step keeps the free
    # ordered before the step on every shard (a preempted sequence is re-prefilled later under
    # the same id, so a free that overtook or trailed a step would corrupt it)
    free: list[int] = field(default_factory=list)
    # cached prompt prefixes (serving/router/prefix.py), [dst, src, tokens] each: pins copy a sequence's
    # blocks into a holder before the frees, copies a holder's into a sequence after them
    pins: list = field(default_factory=list)
    copies: list = field(default_factory=list)
    # no other group is in flight: a CPU shard may use every core of its node for this step if
    # it is a prefill (decode steps keep their share: shards/runtime/cores.py says why)
    # (at concurrency 1 the shards take turns; giving each all cores always would oversubscribe
    # them when groups overlap: measured 20 vs 50 tok/s at 32 concurrent requests)
    alone: bool = False
    # per sequence, the prompt tokens that follow each of its new positions (the first len()
    # of them), for prompt log probabilities; empty for a sequence that wants none. Only the
    # last stage reads it: the others see hidden states, not tokens
    targets: list = field(default_factory=list)
    # per sequence, the tokens it may sample (structured output: serving/router/grammar.py) as
    # int32 bits [ceil(vocab / 32)], or None; empty when no sequence is constrained
    masks: list = field(default_factory=list)
    # the layer the step's input is at: 0 for token ids, a stage's end for its hidden states. A
    # stage computes only a step that starts at its own first layer, so a gap or an overlap in
    # the pipeline's ranges (a failed rollback) is an error, never silently wrong output
    layer: int = 0

    @property
    def width(self) -> int:
        return max(self.q_lens)

    def with_hidden(self, hidden, layer: int) -> "StepBatch":
        """The same step for the stage that starts at `layer`, carrying hidden states of layers
        [0, layer) instead of tokens."""
        return StepBatch(self.seq_ids, self.starts, self.q_lens, None, hidden, self.sampling, self.steps,
                         self.free, self.pins, self.copies, self.alone, self.targets, self.masks, layer)


@dataclass
class Sampled:
    """The last stage's answer to a step: a token id per sequence, and (shards/model/logprobs.py)
    per sequence its log-probability record, or None where no sequence asked for any."""

    tokens: list[int]
    logprobs: list | None = None


# dtypes a step's tensors cross process boundaries in as numpy arrays
_NUMPY = {torch.float32, torch.float16, torch.int64}


def to_wire(t):
    """A CPU tensor as Ray should carry it: a numpy array (pickled out of band), a tensor only for
    dtypes numpy lacks (bf16). Measured here: a StepBatch with a [1, 1, 576] fp32 tensor took 244
    us to serialize and 4.5-6.1 ms an actor round trip, with the same numpy array 63 us and 3.4-3.6
    ms (without either, 3.0-3.3 ms); a token passes two such hops."""
    return t.numpy() if isinstance(t, torch.Tensor) and t.dtype in _NUMPY else t


def from_wire(x):
    """to_wire's inverse: a tensor (Ray's arrays arrive read-only; a copy is made then)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    return x
