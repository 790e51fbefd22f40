"""Next-token choice from logits, per sequence: greedy, temperature, top-k, top-p, seed."""
from __future__ import annotations

import torch

from shards.step import SamplingParams

# below this a temperature is greedy: logits / 1e-45 overflow to inf and softmax gives NaN,
# and any temperature this small picks the argmax anyway (fp32 logits differ by >= 1e-7 x 10)
GREEDY_BELOW = 1e-5


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    """logits: [B, vocab] fp32 -> token ids [B] int64.

    A seeded sequence draws from its own generator seeded by (seed, step), so the same request
    gives the same tokens whichever batch it shares.
    """
    greedy = logits.argmax(dim=-1)
    if all(p.temperature < GREEDY_BELOW for p in params):
        return greedy
    out = greedy.clone()
    for b, p in enumerate(params):
        if p.temperature >= GREEDY_BELOW:
            out[b] = _draw(logits[b], p, steps[b] if steps else 0)
    return out


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits: [vocab] -> probabilities after temperature, top-k and top-p."""
    x = logits / p.temperature
    if p.top_k:
        kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) >= p.top_p   # keep the smallest set reaching top_p
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    return x.softmax(-1)


def _draw(logits: torch.Tensor, p: SamplingParams, step: int) -> torch.Tensor:
    gen = None
    if p.seed is not None:
        # any int seed (OpenAI allows negative and 64-bit ones) folded into manual_seed's range
        gen = torch.Generator().manual_seed((p.seed * 1_000_003 + step) % (1 << 63))
    return torch.multinomial(filtered_probs(logits, p), 1, generator=gen)[0]
