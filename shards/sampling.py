"""Next-token choice from logits for a whole batch at once: greedy, temperature, top-k, top-p,
seed. One sort, one softmax and one search for all sampled rows; no per-sequence tensor work."""
from __future__ import annotations

import torch

from shards.step import SamplingParams

# below this a temperature is greedy: logits / 1e-45 overflow to inf and softmax gives NaN,
# and any temperature this small picks the argmax anyway (fp32 logits differ by >= 1e-7 x 10)
GREEDY_BELOW = 1e-5
_MASK64 = (1 << 64) - 1


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    """logits: [B, vocab] fp32 -> token ids [B] int64.

    A seeded sequence draws its uniform number from (seed, step) alone, so the same request
    gives the same tokens whichever batch it shares.
    """
    greedy = logits.argmax(dim=-1)
    hot = [b for b, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if not hot:
        return greedy
    ps = [params[b] for b in hot]
    probs, order = sorted_probs(logits[hot], ps)                       # [H, vocab] each
    u = torch.tensor([_uniform(p.seed, steps[b] if steps else 0) for b, p in zip(hot, ps)],
                     dtype=probs.dtype).unsqueeze(1)                      # [H, 1] in [0, 1)
    pick = torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True))
    out = greedy.clone()
    out[hot] = order.gather(1, pick.clamp_(max=probs.shape[1] - 1)).squeeze(1)
    return out


def sorted_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [H, vocab] -> (probabilities after temperature, top-k and top-p, [H, C]; the
    token id at each of the C positions, [H, C]). Sorted high to low when a cut needs it."""
    temp = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params]).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype).unsqueeze(1)
    x = logits / temp
    if all(p.top_p == 1.0 for p in params):
        # no nucleus cut: only the top k need ordering (a 49k-vocabulary sort is ~6 ms a row)
        if bool((top_k >= x.shape[1]).all()):
            order = torch.arange(x.shape[1]).expand_as(x)     # no cut at all: vocabulary order
        else:
            x, order = x.topk(int(top_k.max()), dim=-1)
    else:
        x, order = x.sort(-1, descending=True)
    x = x.masked_fill(torch.arange(x.shape[1]).unsqueeze(0) >= top_k, float("-inf"))
    p = x.softmax(-1)
    # keep the smallest set reaching top_p: drop a token once the mass before it reaches top_p
    return p.masked_fill((p.cumsum(-1) - p) >= top_p, 0.0), order


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits: [vocab] -> probabilities after temperature, top-k and top-p, in vocab order
    (unnormalised after top-p: the sampler scales its draw by the kept mass)."""
    probs, order = sorted_probs(logits.unsqueeze(0), [p])
    return torch.zeros_like(probs[0]).scatter(0, order[0], probs[0] / probs[0].sum())


def _uniform(seed: int | None, step: int) -> float:
    """A uniform draw in [0, 1): from the global generator, or (seeded) from splitmix64 of
    (seed, step), a counter-based generator: no per-step Generator object."""
    if seed is None:
        return torch.rand(()).item()
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)
