import pytest
import torch

from shards.model.sampling import filtered_probs, sample
from shards.model.step import SamplingParams

pytestmark = pytest.mark.unit


def test_greedy_and_top_k_1_pick_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [SamplingParams()] * 2, [0, 0]).tolist() == [1, 0]
    p = SamplingParams(temperature=1.5, top_k=1)
    assert sample(logits, [p, p], [0, 0]).tolist() == [1, 0]


def test_seed_reproducible_and_step_dependent():
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, [p], [s]).item() for s in range(5)]
    assert a == [sample(logits, [p], [s]).item() for s in range(5)]
    assert len(set(a)) > 1


def test_top_p_keeps_smallest_set():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert probs[2] == 0 and probs[3] == 0
    assert probs[:2].sum().item() == pytest.approx(1.0)


def test_bad_params_refused():
    with pytest.raises(ValueError, match="temperature -1"):
        SamplingParams(temperature=-1)


def test_tiny_temperature_is_greedy_and_big_seeds_work():
    """temperature 1e-45 made logits / T overflow to inf and softmax NaN inside the last shard."""
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    assert sample(logits, [SamplingParams(temperature=1e-45)], [0]).tolist() == [1]
    for seed in (2**64 - 1, -(2**63), 0):
        p = SamplingParams(temperature=1.0, seed=seed, top_k=10**6)   # top_k over the vocab: all kept
        assert 0 <= sample(logits, [p], [3]).item() < 3


def test_bad_params_refused_nan_included():
    for bad in ({"temperature": float("nan")}, {"top_p": float("nan")}, {"temperature": float("inf")},
                {"stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_batch_rows_independent_of_their_neighbours():
    """A seeded row gives the same token alone or beside other rows (greedy and unseeded ones)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 500)
    p = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=11)
    alone = [sample(logits[i:i + 1], [p], [s]).item() for i, s in enumerate([0, 1, 2, 3])]
    mixed = sample(logits, [p, SamplingParams(), p, SamplingParams(temperature=1.0)], [0, 1, 2, 3]).tolist()
    assert mixed[0] == alone[0] and mixed[2] == alone[2] and mixed[1] == logits[1].argmax().item()


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_k=3)
    counts = torch.bincount(torch.stack([sample(logits, [p], [0]) for _ in range(4000)]).flatten(), minlength=4)
    assert counts[3] == 0
    assert abs(counts[0] / 4000 - 0.5 / 0.95) < 0.04 and abs(counts[2] / 4000 - 0.15 / 0.95) < 0.03


def test_top_k_row_beside_an_uncut_row():
    """One row cut to top-2, its neighbour uncut: the cut must follow the sorted order."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [0.0, 5.0, 1.0, 4.0]])
    ps = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0)]
    seen = {tuple(sample(logits, ps, [0, 0]).tolist())[0] for _ in range(300)}
    assert seen == {1, 3}


def test_ranking_few_candidates_draws_what_a_whole_sort_draws():
    """Cut rows rank their best 256, then 4096 tokens, sorting the row whole only when the
    nucleus closes in neither: every tier gives the draw a whole sort gives for the same seed."""
    from shards.model.sampling import _uniform, sorted_probs
    g = torch.Generator().manual_seed(0)
    peaked = -1.5 * torch.log(torch.arange(1, 5001).float())[torch.randperm(5000, generator=g)]
    logits = torch.stack([peaked, peaked.roll(7), torch.randn(5000, generator=g) * 0.5, torch.zeros(5000)])
    # row 0 closes within 256, row 1 (top_k 300) within 300, row 2 within 4096, row 3 (flat) in none
    ps = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=1.0, top_k=300, seed=2),
          SamplingParams(temperature=1.0, top_p=0.5, seed=3), SamplingParams(temperature=1.0, top_p=0.9, seed=4)]
    assert [sorted_probs(logits[b:b + 1], [ps[b]], w)[2].item() for b, w in ((0, 256), (2, 256), (2, 4096), (3, 4096))] \
        == [True, False, True, False]
    for step in range(100):
        want = []
        for b, p in enumerate(ps):
            probs, order, _ = sorted_probs(logits[b:b + 1], [p], None)
            u = _uniform(p.seed, step) * probs.sum()
            want.append(order[0, torch.searchsorted(probs.cumsum(-1)[0], u).clamp(max=probs.shape[1] - 1)].item())
        assert sample(logits, ps, [step] * 4).tolist() == want
