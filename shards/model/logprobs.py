"""Log probabilities of the model's next-token distribution, taken in the last stage so that
only a few numbers per position leave it, never a vocabulary-wide row.

They are log_softmax of the raw logits: the model's distribution before temperature, top-k and
top-p (as vLLM and llama-server report them), so they do not depend on how a request samples.

A sequence's record, as it travels back to the router (JSON-safe lists):
    [sampled, prompt]
    sampled: [logprob of the token sampled at its last position, [[id, logprob], ...]], or None
    prompt:  one such entry per prompt position of the step that has a following prompt token
             (batch.targets), in position order
An entry's alternatives are the k most likely tokens, most likely first.
"""
from __future__ import annotations

import torch

from shards.model.step import StepBatch


def prompt_rows(batch: StepBatch) -> list[tuple[int, int]]:
    """(row, position within the step) of every position whose following prompt token a
    sequence asked the log probability of: these rows' logits come besides the last ones."""
    return [(b, j) for b, t in enumerate(batch.targets or ()) for j in range(len(t))]


def step_logprobs(logits: torch.Tensor, tokens: torch.Tensor, batch: StepBatch,
                  extra: list[tuple[int, int]]) -> list | None:
    """logits: [B + len(extra), vocab] fp32, each sequence's last position first, then the rows
    of `extra` (prompt_rows); tokens: [B] sampled ids. Per sequence its record (module doc), or
    None when it wants none; None for the whole step when no sequence wants any."""
    n = len(batch.seq_ids)
    want = [b for b, p in enumerate(batch.sampling) if p.logprobs is not None]
    if not want and not extra:
        return None
    rows = want + list(range(n, n + len(extra)))
    chosen = [int(tokens[b]) for b in want] + [batch.targets[b][j] for b, j in extra]
    ks = [batch.sampling[b].logprobs for b in want] + [batch.sampling[b].prompt_logprobs or 0 for b, _ in extra]
    got = entries(logits[rows], torch.tensor(chosen), ks)
    out: list = [None] * n
    for b in want:
        out[b] = [got.pop(0), []]
    for b, _ in extra:
        if out[b] is None:
            out[b] = [None, []]
        out[b][1].append(got.pop(0))
    return out


def entries(logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[list]:
    """logits [R, vocab], chosen [R] ids, ks: alternatives per row -> per row
    [logprob of chosen, [[id, logprob] x k]]. One log_softmax and one topk for all rows."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, chosen.view(-1, 1))[:, 0].tolist()
    k = max(ks, default=0)
    if k:
        vals, ids = lp.topk(k, dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
    return [[picked[r], [[ids[r][i], vals[r][i]] for i in range(ks[r])] if ks[r] else []]
            for r in range(len(ks))]
