"""Planner properties over synthetic measured costs (pure, no torch model)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards import LayerRange, PlanError, RangeError
from shards.plan.footprint import Overheads
from shards.plan.memory import ModelCosts
from shards.plan.plan import MiB, MoveLayers, Plan, Recompress, ShardSpec, diff
from shards.plan.planner import plan, shard_weight_bytes

pytestmark = pytest.mark.unit


def costs(n_layers=30, layer=14 * MiB, embed=108 * MiB, head_compute=8.0, tied=True):
    """SmolLM2-135M's measured fp32 costs and shape."""
    return ModelCosts("m", n_layers, (layer,) * n_layers, embed, 2304, embed, tied, 1536, head_compute,
                      hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                      source_layer_bytes=layer)


# this machine's measured runtime and inductor's (shards/runtime/probe.py), rounded
OVERHEADS = Overheads(runtime_bytes=393 * MiB, compiled_bytes=57 * MiB, compiled_layer_bytes=6 * MiB)


def test_default_model_shape_two_shards_balanced_by_compute():
    p = plan(costs(), 2)
    # lm_head costs ~8 layers of compute, so the last shard takes fewer layers
    assert p.ranges == [LayerRange(0, 19), LayerRange(19, 30)]
    assert p.shards[0].weight_bytes == 19 * 14 * MiB + 108 * MiB
    assert p.shards[1].weight_bytes == 11 * 14 * MiB + 2304 + 108 * MiB  # tied head copied


def test_single_shard_counts_tied_head_once():
    c = costs()
    assert shard_weight_bytes(c, LayerRange(0, 30)) == 30 * 14 * MiB + 108 * MiB + 2304


@settings(max_examples=200, deadline=None)
@given(n_layers=st.integers(1, 64), data=st.data())
def test_every_layer_once_contiguous_deterministic(n_layers, data):
    n_shards = data.draw(st.integers(1, n_layers))
    c = costs(n_layers, head_compute=data.draw(st.floats(0, 20)))
    p = plan(c, n_shards)
    assert [x for r in p.ranges for x in r] == list(range(n_layers))
    assert all(len(r) >= 1 for r in p.ranges)
    assert plan(c, n_shards) == p


@settings(max_examples=200, deadline=None)
@given(n_layers=st.integers(2, 40), data=st.data())
def test_budgeted_plans_fit_or_refuse_with_numbers(n_layers, data):
    n_shards = data.draw(st.integers(1, min(n_layers, 6)))
    budgets = data.draw(st.lists(st.integers(50 * MiB, 900 * MiB), min_size=n_shards, max_size=n_shards))
    c = costs(n_layers)
    try:
        p = plan(c, n_shards, budgets, overheads=OVERHEADS)
    except PlanError as e:
        assert "MiB" in str(e) and "shard" in str(e)
        return
    for s, b in zip(p.shards, budgets):
        # a budget bounds all the shard holds but its runtime: weights, KV, graphs, workspace
        f = s.footprint
        assert f.held == f.weights + f.kv + f.compiled + f.workspace <= b and f.runtime == 393 * MiB
        assert f.compiled == (57 + 6 * len(s.layers)) * MiB and f.workspace > 0
        assert s.kv_tokens >= 512


def test_no_fit_error_names_shard_layers_bytes():
    with pytest.raises(PlanError, match=r"shard 0 needs \d+ MiB for layers \[0, 15\) at fp32, worker has 300 MiB"):
        plan(costs(), 2, [300 * MiB, 300 * MiB])


def test_bad_counts():
    with pytest.raises(RangeError, match="at least one shard"):
        plan(costs(), 0)
    with pytest.raises(RangeError, match="31 shards for 30 layers"):
        plan(costs(), 31)
    with pytest.raises(PlanError, match="3 budgets given for 2 shards"):
        plan(costs(), 2, [1, 2, 3])


def test_plan_rejects_gaps_and_diff_moves_boundaries():
    with pytest.raises(PlanError, match="expected 10"):
        Plan("m", 30, (ShardSpec(0, LayerRange(0, 10)), ShardSpec(1, LayerRange(11, 30))))
    old = Plan("m", 30, (ShardSpec(0, LayerRange(0, 15)), ShardSpec(1, LayerRange(15, 30))))
    new = Plan("m", 30, (ShardSpec(0, LayerRange(0, 10)), ShardSpec(1, LayerRange(10, 30), "int8")))
    assert diff(old, new) == [MoveLayers(0, 1, LayerRange(10, 15)), Recompress(1, "int8")]
    assert diff(new, old)[0] == MoveLayers(1, 0, LayerRange(10, 15))
