"""Tier 1: log probabilities as the last stage takes them (shards/model/logprobs.py)."""
import pytest
import torch

from shards.model.logprobs import prompt_rows, step_logprobs
from shards.model.step import SamplingParams, StepBatch

pytestmark = pytest.mark.unit


def test_records_are_the_raw_distribution_whatever_the_sampling():
    """Two sequences: one wants 2 alternatives of its sampled token (sampling hot: the numbers
    are still log_softmax of the raw logits), one wants its prompt scored; rows come in
    last-positions-first order, then the prompt rows."""
    torch.manual_seed(0)
    batch = StepBatch([1, 2], [0, 0], [1, 3], sampling=[SamplingParams(temperature=1.5, logprobs=2),
                                                        SamplingParams(prompt_logprobs=1)],
                      targets=[[], [5, 6]])
    extra = prompt_rows(batch)
    assert extra == [(1, 0), (1, 1)]
    logits = torch.randn(2 + len(extra), 10)
    tokens = torch.tensor([3, 4])
    out = step_logprobs(logits, tokens, batch, extra)
    lp = torch.log_softmax(logits, -1)
    top = lp[0].topk(2)
    assert out[0][0][0] == pytest.approx(float(lp[0, 3]))
    assert out[0][0][1] == [[i, pytest.approx(v)] for i, v in zip(top.indices.tolist(), top.values.tolist())]
    assert out[0][1] == []
    assert out[1][0] is None                      # no logprobs for its sampled token
    assert [e[0] for e in out[1][1]] == pytest.approx([float(lp[2, 5]), float(lp[3, 6])])
    assert out[1][1][0][1][0][0] == int(lp[2].argmax())


def test_no_request_for_them_costs_nothing():
    batch = StepBatch([1], [4], [1], sampling=[SamplingParams()])
    assert prompt_rows(batch) == [] and step_logprobs(torch.randn(1, 10), torch.tensor([1]), batch, []) is None


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="logprobs must be 0 to 20"):
        SamplingParams(logprobs=21)
