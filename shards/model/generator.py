"""One-process reference generator: stages chained in order, KV-cached, greedy or sampled.

Tests compare it with transformers; the Ray pipeline distributes the same stages.
"""
from __future__ import annotations

import itertools

import torch

from shards.model.sampling import sample
from shards.model.source import ModelSource
from shards.model.stage import Stage
from shards.model.step import SamplingParams, StepBatch
from shards.plan.layer_range import LayerRange, split_even


class Generator:
    def __init__(self, source: ModelSource, ranges: list[LayerRange] | int = 1,
                 kv_blocks: int = 256, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 compression: str = "fp32", compile: bool = False, calibration=None, device: str = "cpu"):
        if isinstance(ranges, int):
            ranges = split_even(source.n_layers, ranges)
        self.source = source
        self.stages = [Stage(source, r, kv_blocks, block_size, dtype, device, compression=compression,
                             compile=compile, calibration=calibration) for r in ranges]
        eos = source.config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self._ids = itertools.count()

    def step(self, batch: StepBatch, all_logits: bool = False) -> torch.Tensor:
        """Run one step through every stage; returns the last stage's logits."""
        x = None
        for stage in self.stages:
            x = stage(batch if x is None else batch.with_hidden(x, stage.layers.start), all_logits=all_logits)
        return x

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits for every position of one prompt: [len, vocab] (cache freed after)."""
        sid = next(self._ids)
        batch = StepBatch([sid], [0], [len(tokens)], tokens=torch.tensor([tokens]))
        try:
            return self.step(batch, all_logits=True)[0]
        finally:
            self.free(sid)

    def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
                 stop_at_eos: bool = True) -> list[list[int]]:
        """Prefill each prompt, then decode them together until eos or max_tokens."""
        sids = [next(self._ids) for _ in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        try:
            last = [self._prefill(s, p, params) for s, p in zip(sids, prompts)]
            live = list(range(len(prompts)))
            for b in live:
                outs[b].append(last[b])
            lengths = [len(p) for p in prompts]
            while True:
                live = [b for b in live if len(outs[b]) < params.max_tokens
                        and not (stop_at_eos and outs[b][-1] in self.eos)]
                if not live:
                    return outs
                batch = StepBatch([sids[b] for b in live], [lengths[b] + len(outs[b]) - 1 for b in live],
                                  [1] * len(live), tokens=torch.tensor([[outs[b][-1]] for b in live]))
                nxt = sample(self.step(batch), [params] * len(live), [len(outs[b]) for b in live])
                for b, t in zip(live, nxt.tolist()):
                    outs[b].append(t)
        finally:
            for s in sids:
                self.free(s)

    def _prefill(self, sid: int, prompt: list[int], params: SamplingParams) -> int:
        batch = StepBatch([sid], [0], [len(prompt)], tokens=torch.tensor([prompt]))
        return sample(self.step(batch), [params], [0]).item()

    def free(self, sid: int) -> None:
        for stage in self.stages:
            stage.free(sid)
