"""Tier 1: the controller's pure policy, driven by a fake clock."""
import pytest

from serving.config import ControllerConfig
from serving.control.policy import PolicyState, ShardReading, Snapshot, acted, decide, least_bytes, pressure
from shards import LayerRange
from shards.plan.plan import MoveLayers, Recompress, SplitShard

pytestmark = pytest.mark.unit

# a ladder as serving/launch.py::measured_ladder measures it on the default model (a layer's
# bytes at each step / fp32's)
LADDER = {"ladder": ("fp32", "w8a16", "w4a16", "nf4"), "ladder_bytes": (1.00, 0.25, 0.18, 0.16)}


def config(**kw) -> ControllerConfig:
    return ControllerConfig(**{**LADDER, **kw})

MiB = 1 << 20
GiB = 1 << 30


def shard(index, start, end, used, budget=None, comp="fp32", node="n1", free=10 * GiB, layer=20 * MiB):
    return ShardReading(index=index, name=f"shard-{index}", start=start, end=end, compression=comp,
                        used_bytes=used, weight_bytes=(end - start) * 14 * MiB, layer_bytes=layer,
                        runtime_bytes=400 * MiB, budget_bytes=budget, node=node, node_available_bytes=free)


def run(cfg, readings, state=None, t0=0.0, dt=1.0):
    """Feed snapshots one second apart; returns [(time, actions)] where actions happened, and the state."""
    state = state or PolicyState()
    acts = []
    for i, shards in enumerate(readings):
        t = t0 + i * dt
        actions, state = decide(Snapshot(t, 30, tuple(shards)), cfg, state)
        if actions:
            acts.append((t, actions))
    return acts, state


def test_pressure_names_the_numbers():
    cfg = config()
    assert pressure(shard(0, 0, 19, 300 * MiB, budget=400 * MiB), cfg) is None
    why = pressure(shard(0, 0, 19, 500 * MiB, budget=400 * MiB), cfg)
    assert "500 MiB of its 400 MiB" in why and "125%" in why
    assert "100 MiB free" in pressure(shard(1, 19, 30, 10, free=100 * MiB), cfg)


def test_acts_after_k_readings_and_moves_to_the_neighbour_with_room():
    cfg = config(readings=3)
    hot = [shard(0, 0, 19, 500 * MiB, budget=400 * MiB), shard(1, 19, 30, 250 * MiB)]
    acts, _ = run(cfg, [hot] * 5)
    assert [t for t, _ in acts] == [2.0]       # the third reading, not before
    (a,) = acts[0][1]
    # free 500 - 0.85 * 400 = 160 MiB at 20 MiB per layer: 8 layers from the top of shard 0
    assert a == MoveLayers(0, 1, LayerRange(11, 19), a.reason)
    assert "500 MiB of its 400 MiB" in a.reason


def test_a_reading_under_the_watermark_resets_the_count():
    cfg = config(readings=3)
    hot = [shard(0, 0, 19, 500 * MiB, budget=400 * MiB), shard(1, 19, 30, 250 * MiB)]
    cool = [shard(0, 0, 19, 300 * MiB, budget=400 * MiB), shard(1, 19, 30, 250 * MiB)]
    acts, _ = run(cfg, [hot, hot, cool, hot, hot, cool] * 5)
    assert acts == []


def test_hovering_at_the_watermark_at_most_one_action_per_quiet_period():
    """Use that sits just over the watermark and never falls (the action does not help, as with
    a budget set below the runtime): one action, then nothing until the quiet period is over."""
    cfg = config(readings=2, quiet_s=20)
    budget = 400 * MiB
    over = [shard(0, 0, 19, int(0.951 * budget), budget=budget), shard(1, 19, 30, 250 * MiB)]
    under = [shard(0, 0, 19, int(0.949 * budget), budget=budget), shard(1, 19, 30, 250 * MiB)]
    acts, _ = run(cfg, [over, over, under, over, over, over] * 20)   # 120 s of readings
    times = [t for t, _ in acts]
    assert len(times) >= 3
    assert all(b - a >= cfg.quiet_s for a, b in zip(times, times[1:]))


def test_quiet_period_counts_from_the_end_of_the_action():
    cfg = config(readings=1, quiet_s=10)
    hot = [shard(0, 0, 19, 500 * MiB, budget=400 * MiB), shard(1, 19, 30, 250 * MiB)]
    acts, state = run(cfg, [hot])
    state = acted(state, 30.0)                      # the action took 30 s
    acts, _ = run(cfg, [hot] * 20, state, t0=31.0)
    assert acts[0][0] == 40.0


def test_no_neighbour_room_splits_then_recompresses():
    full = shard(1, 19, 30, 390 * MiB, budget=400 * MiB)
    hot = [shard(0, 0, 19, 500 * MiB, budget=400 * MiB), full]
    (_, (a,)), = run(config(readings=1), [hot])[0]
    assert isinstance(a, SplitShard) and a.shard == 0 and "no neighbour has room" in a.reason
    cfg = config(readings=1, actions=("move", "recompress"))
    (_, (a,)), = run(cfg, [hot])[0]
    # 160 MiB to free; w8a16 saves 0.75 of 266 MiB of weights: one ladder step is enough
    assert a == Recompress(0, "w8a16", a.reason) and "fp32 -> w8a16" in a.reason


def test_node_pressure_needs_another_node():
    cfg = config(readings=1, actions=("move",))
    low = 400 * MiB    # 112 MiB under the 512 MiB floor: 6 layers of 20 MiB
    same = [shard(0, 0, 19, 500 * MiB, free=low), shard(1, 19, 30, 250 * MiB, free=low)]
    assert run(cfg, [same])[0] == []
    other = [shard(0, 0, 19, 500 * MiB, free=low), shard(1, 19, 30, 250 * MiB, node="n2", free=4 * GiB)]
    (_, (a,)), = run(cfg, [other])[0]
    assert a == MoveLayers(0, 1, LayerRange(13, 19), a.reason) and "400 MiB free" in a.reason


def test_raised_compression_comes_back_only_after_a_long_calm():
    cfg = config(readings=1, quiet_s=5, relax_s=60, actions=("recompress",))
    hot = [shard(0, 0, 19, 500 * MiB, budget=400 * MiB), shard(1, 19, 30, 250 * MiB)]
    (_, (a,)), state = run(cfg, [hot])[0][0], run(cfg, [hot])[1]
    assert a.compression == "w8a16" and state.raised == {"shard-0": "fp32"}
    # the budget is lifted: int8 weights (0.25 of fp32) and plenty of room to go back
    calm = [shard(0, 0, 19, 200 * MiB, budget=2 * GiB, comp="w8a16"), shard(1, 19, 30, 250 * MiB)]
    calm[0] = ShardReading(**{**calm[0].__dict__, "weight_bytes": 66 * MiB})
    acts, state = run(cfg, [calm] * 120, state, t0=10.0)
    assert [t for t, _ in acts] == [10.0 + 60]
    assert acts[0][1][0] == Recompress(0, "fp32", acts[0][1][0].reason) and state.raised == {}


def test_served_spec_joins_the_ladder_by_its_bytes_and_comes_back_as_itself():
    """A served spec off the registry's ladder (w8a8) sits on it by its measured bytes: 160 MiB
    to free of 600, w8a16 saves only 23 MiB, w4a16 185; relaxing steps back through w8a16 to
    w8a8 itself, one step per calm spell."""
    ladder = {"ladder": ("fp32", "w8a8", "w8a16", "w4a16", "nf4"), "ladder_bytes": (1.00, 0.26, 0.25, 0.18, 0.16)}
    cfg = config(readings=1, quiet_s=5, relax_s=60, actions=("recompress",), **ladder)
    hot = [ShardReading(**{**shard(0, 0, 19, 500 * MiB, budget=400 * MiB, comp="w8a8").__dict__,
                           "weight_bytes": 600 * MiB}), shard(1, 19, 30, 250 * MiB)]
    acts, state = run(cfg, [hot])
    assert acts[0][1][0] == Recompress(0, "w4a16", acts[0][1][0].reason)
    assert state.raised == {"shard-0": "w8a8"}
    calm = [ShardReading(**{**shard(0, 0, 19, 200 * MiB, budget=2 * GiB, comp="w4a16").__dict__,
                            "weight_bytes": 144 * MiB}), shard(1, 19, 30, 250 * MiB)]
    acts, state = run(cfg, [calm] * 120, state, t0=10.0)
    assert acts[0][1][0] == Recompress(0, "w8a16", acts[0][1][0].reason) and state.raised == {"shard-0": "w8a8"}
    calm = [ShardReading(**{**calm[0].__dict__, "compression": "w8a16", "weight_bytes": 200 * MiB}), calm[1]]
    acts, state = run(cfg, [calm] * 120, state, t0=200.0)
    assert acts[0][1][0] == Recompress(0, "w8a8", acts[0][1][0].reason) and state.raised == {}


def test_relax_waits_when_the_lighter_compression_would_not_fit():
    cfg = config(readings=1, relax_s=10)
    state = PolicyState(raised={"shard-0": "fp32"})
    # 300 MiB used of 400; fp32 would add 3 x 66 MiB = 198 MiB: over the low watermark
    tight = [ShardReading(**{**shard(0, 0, 19, 300 * MiB, budget=400 * MiB, comp="w8a16").__dict__,
                             "weight_bytes": 66 * MiB}), shard(1, 19, 30, 250 * MiB)]
    assert run(cfg, [tight] * 100, state)[0] == []


def test_bad_config_refused():
    with pytest.raises(ValueError, match="watermarks"):
        config(low_watermark=0.9, high_watermark=0.8)
    with pytest.raises(ValueError, match=r"(?s)actions.*'move', 'split' or 'recompress'"):
        config(actions=("move", "teleport"))


def test_action_sized_by_the_least_use_of_the_streak():
    """A prefill spike in the first reading must not move more layers than the lasting use asks."""
    cfg = config(readings=2)
    spike = [shard(0, 0, 19, 700 * MiB, budget=400 * MiB), shard(1, 19, 30, 250 * MiB)]
    hot = [shard(0, 0, 19, 500 * MiB, budget=400 * MiB), shard(1, 19, 30, 250 * MiB)]
    (_, (a,)), = run(cfg, [spike, hot])[0]
    assert a.layers == LayerRange(11, 19)      # 160 MiB to free, not 360


def test_least_bytes_is_the_weights_at_the_last_ladder_step_plus_what_is_not_weights():
    r = shard(0, 0, 10, used=200 * MiB)                 # 140 MiB of fp32 weights, 60 MiB of KV and workspace
    assert least_bytes(r, config()) == (60 * MiB + int(140 * MiB * 0.16), "nf4")
    at_w4 = shard(0, 0, 10, used=200 * MiB, comp="w4a16")
    assert least_bytes(at_w4, config()) == (60 * MiB + int(140 * MiB * 0.16 / 0.18), "nf4")
    # nothing will recompress: its use now is the least
    assert least_bytes(r, config(actions=("move", "split"))) == (200 * MiB, "fp32")
    assert least_bytes(r, None) == (200 * MiB, "fp32")
    assert least_bytes(shard(0, 0, 10, used=200 * MiB, comp="fp4"), config()) == (200 * MiB, "fp4")   # off the ladder


def test_least_bytes_counts_the_layers_moves_and_splits_can_take():
    """A budget a move to a neighbour with room could meet is not refused: the floor keeps only
    the layers no action can take away (one at least)."""
    r = shard(0, 0, 10, used=200 * MiB, budget=300 * MiB)     # 20 MiB a layer, 14 of it weights
    per_layer = 20 * MiB - (140 * MiB - int(140 * MiB * 0.16)) // 10         # one layer at nf4
    roomy = shard(1, 10, 20, used=100 * MiB, budget=400 * MiB)  # 0.85 * 400 - 100 = 240 MiB: 12 layers
    snap = Snapshot(0.0, 20, (r, roomy))
    floor = 200 * MiB - (140 * MiB - int(140 * MiB * 0.16)) - 9 * per_layer
    assert least_bytes(r, config(), snap) == (floor, "nf4")
    # room for 3 layers only, no split: 7 stay
    tight = shard(1, 10, 20, used=280 * MiB, budget=400 * MiB)   # 60 MiB: 3 layers
    assert least_bytes(r, config(actions=("move", "recompress")), Snapshot(0.0, 20, (r, tight))) == (200 * MiB - (140 * MiB - int(140 * MiB * 0.16)) - 3 * per_layer, "nf4")
    # no room next door, but a split may take half where the node has room for a new actor
    full = shard(1, 10, 20, used=340 * MiB, budget=400 * MiB)
    assert least_bytes(r, config(), Snapshot(0.0, 20, (r, full))) == (200 * MiB - (140 * MiB - int(140 * MiB * 0.16)) - 5 * per_layer, "nf4")
    assert least_bytes(r, config(max_shards=2), Snapshot(0.0, 20, (r, full))) == least_bytes(r, config())
    # moves only, no recompression: whole fp32 layers leave
    assert least_bytes(r, config(actions=("move",)), snap) == (200 * MiB - 9 * 20 * MiB, "fp32")
    assert least_bytes(r, config(actions=("recompress",)), snap) == least_bytes(r, config())
