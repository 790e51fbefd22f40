"""Next-token choice from logits for a whole batch at once: greedy, temperature, top-k, top-p,
seed. Rows are ranked together (their best few tokens, a whole sort only where a nucleus needs
it), one softmax and one search per group of rows; no per-sequence tensor work."""
from __future__ import annotations

import numpy as np
import torch

from shards.model.step import SamplingParams

# below this a temperature is greedy: logits / 1e-45 overflow to inf and softmax gives NaN,
# and any temperature this small picks the argmax anyway (fp32 logits differ by >= 1e-7 x 10)
GREEDY_BELOW = 1e-5
_MASK64 = (1 << 64) - 1


# how many of a cut row's (top-k or top-p) best tokens are ranked, widest last: rows whose
# nucleus does not close within one try the next; None sorts the row whole. SmolLM2's logits
# while it samples (190 positions, temperature 1): top_p 0.9 closes within 256 tokens at 91%
# of them, 0.95 at 82% (4096: 100%, 99.5%). 8 rows, 1 thread, ms a step: temperature 0.7
# top_p 0.9, 51.9 sorted whole -> 5.7; no cut at all 14.4 -> 4.1 (one softmax, vocabulary order)
WIDTHS = (256, 4096, None)


def allow_only(logits: torch.Tensor, masks: list) -> torch.Tensor:
    """logits [B, vocab] with what each row's mask does not allow at -inf (a copy; as given when
    no row has a mask). masks[b]: int32 bits [ceil(vocab / 32)], bit t % 32 of word t // 32 set
    for an allowed token t, or None."""
    rows = [b for b, m in enumerate(masks) if m is not None]
    if not rows:
        return logits
    bits = torch.from_numpy(np.stack([np.asarray(masks[b], dtype=np.int32) for b in rows]))   # [R, W]
    allowed = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool()        # [R, W, 32]
    allowed = allowed.view(len(rows), -1)[:, :logits.shape[1]]
    out = logits.clone()
    out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    """logits: [B, vocab] fp32 -> token ids [B] int64.

    A seeded sequence draws its uniform number from (seed, step) alone, so the same request
    gives the same tokens whichever batch it shares.
    """
    greedy = logits.argmax(dim=-1)
    hot = [b for b, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if not hot:
        return greedy
    out = greedy.clone()
    u = {b: _uniform(params[b].seed, steps[b] if steps else 0) for b in hot}
    vocab = logits.shape[1]
    uncut = [b for b in hot if params[b].top_p == 1.0 and not 0 < params[b].top_k < vocab]
    cut = sorted(set(hot) - set(uncut))
    for rows, widths in ((uncut, [None]), (cut, list(WIDTHS))):
        while rows:
            probs, order, covered = sorted_probs(logits[rows], [params[b] for b in rows], widths.pop(0))
            covered = covered.tolist()
            done = [i for i, c in enumerate(covered) if c]
            if len(done) < len(rows):
                probs, order = probs[done], order[done]
            uu = torch.tensor([u[rows[i]] for i in done], dtype=probs.dtype).unsqueeze(1)   # [H, 1]
            pick = torch.searchsorted(probs.cumsum(-1), uu * probs.sum(-1, keepdim=True))
            out[[rows[i] for i in done]] = order.gather(1, pick.clamp_(max=probs.shape[1] - 1)).squeeze(1)
            rows = [b for b, c in zip(rows, covered) if not c]
    return out


def sorted_probs(logits: torch.Tensor, params: list[SamplingParams], width: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [H, vocab] -> (probabilities after temperature, top-k and top-p, [H, C]; the
    token id at each of the C positions, [H, C]; whether a row's kept tokens all lie in its C,
    [H] bool). Sorted high to low when a cut needs it; width: rank only the top `width` tokens
    (rows whose cut does not close within them come back not covered)."""
    temp = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
    top_k = torch.tensor([p.top_k or logits.shape[1] for p in params]).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype).unsqueeze(1)
    x, vocab = logits / temp, logits.shape[1]
    every = torch.ones(len(params), dtype=torch.bool)
    if all(p.top_p == 1.0 for p in params) and bool((top_k >= vocab).all()):
        return x.softmax(-1), torch.arange(vocab).expand_as(x), every   # no cut: vocabulary order
    if width is not None and width < vocab:
        width = min(width, int(top_k.max()))           # every row's top-k cut within it: no more
        vals, order = x.topk(width, dim=-1)
        vals = vals.masked_fill(torch.arange(width).unsqueeze(0) >= top_k, float("-inf"))
        # normalised over the row's allowed tokens: all within the candidates under a top-k cut
        # at or below the width, the whole row otherwise
        lse = torch.where(top_k <= width, vals.logsumexp(-1, keepdim=True), x.logsumexp(-1, keepdim=True))
        p = (vals - lse).exp()
        covered = (top_k[:, 0] <= width) | (p.sum(-1) >= top_p[:, 0])
        return p.masked_fill((p.cumsum(-1) - p) >= top_p, 0.0), order, covered
    if all(p.top_p == 1.0 for p in params):
        x, order = x.topk(int(top_k.max()), dim=-1)      # only the top k need ordering
    else:
        x, order = x.sort(-1, descending=True)
    x = x.masked_fill(torch.arange(x.shape[1]).unsqueeze(0) >= top_k, float("-inf"))
    p = x.softmax(-1)
    # keep the smallest set reaching top_p: drop a token once the mass before it reaches top_p
    return p.masked_fill((p.cumsum(-1) - p) >= top_p, 0.0), order, every


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits: [vocab] -> probabilities after temperature, top-k and top-p, in vocab order
    (unnormalised after top-p: the sampler scales its draw by the kept mass)."""
    probs, order, _ = sorted_probs(logits.unsqueeze(0), [p])
    return torch.zeros_like(probs[0]).scatter(0, order[0], probs[0] / probs[0].sum())


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of a request's choice `choice` (its `n`): the request's own for the first, so
    n=1 and the first of n draw the same tokens; a golden-ratio step apart for the others."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice * 0x9E3779B97F4A7C15) & _MASK64


def _uniform(seed: int | None, step: int) -> float:
    """A uniform draw in [0, 1): from the global generator, or (seeded) from splitmix64 of
    (seed, step), a counter-based generator: no per-step Generator object."""
    if seed is None:
        return torch.rand(()).item()
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)
