"""shards/runtime/cores.py: the threads, team and lending each kind of step gets."""
import pytest

from shards.plan.layer_range import LayerRange
from shards.plan.plan import ShardSpec
from shards.runtime import cores
from shards.runtime.cores import CoreShare, StepCores

pytestmark = pytest.mark.unit


def spec(compression: str, weight_bytes: int = 64 << 20, device: str = "cpu") -> ShardSpec:
    return ShardSpec(0, LayerRange(0, 4), weight_bytes=weight_bytes, compression=compression, device=device)


def test_a_4bit_shard_takes_the_other_cores_through_its_team(monkeypatch):
    monkeypatch.delenv("SHARDSERVE_TEAM_PREFILL_ROWS", raising=False)
    share = CoreShare.of(spec("w4a8x2"), threads=1, all_cores=2)
    assert share == CoreShare(1, 2, 2, False)
    assert share.step(alone=True, width=1, rows=1) == StepCores(1, 2, 1)
    assert share.step(alone=True, width=1, rows=8) == StepCores(1, 2, 1)      # 8 sequences, one token each
    # a short prefill on the team, one torch thread; a long one on torch's threads, every core
    rows = cores.TEAM_PREFILL_ROWS
    assert share.step(alone=True, width=20, rows=20) == StepCores(1, 2, 1)
    assert share.step(alone=True, width=rows, rows=rows) == StepCores(1, 2, 1)
    assert share.step(alone=True, width=rows + 1, rows=rows + 1) == StepCores(2, 1, 1)
    assert share.step(alone=True, width=16, rows=rows + 1) == StepCores(2, 1, 1)   # rows of all sequences count
    # overlapped by other groups: its share, lending its helpers call by call
    assert share.step(alone=False, width=1, rows=4) == StepCores(1, 1, 2)
    assert share.step(alone=False, width=20, rows=20) == StepCores(1, 1, 2)
    monkeypatch.setattr(cores, "LEND", False)
    assert share.step(alone=False, width=1, rows=4) == StepCores(1, 1, 1)


def test_the_short_prefill_threshold_is_read_each_step(monkeypatch):
    share = CoreShare.of(spec("w4a8x2"), threads=1, all_cores=2)
    monkeypatch.setenv("SHARDSERVE_TEAM_PREFILL_ROWS", "0")
    assert share.step(alone=True, width=20, rows=20) == StepCores(2, 1, 1)
    monkeypatch.setenv("SHARDSERVE_TEAM_PREFILL_ROWS", "4096")
    assert share.step(alone=True, width=2000, rows=2000) == StepCores(1, 2, 1)


def test_shards_without_the_team_prefill_and_decode_on_torch_threads(monkeypatch):
    monkeypatch.delenv("SHARDSERVE_ALONE_DECODE_BYTES", raising=False)
    big = CoreShare.of(spec("fp32", cores.ALONE_DECODE_BYTES), threads=1, all_cores=2)
    assert big == CoreShare(1, 2, 1, True)
    assert big.step(alone=True, width=1, rows=1) == StepCores(2, 1, 1)
    assert big.step(alone=True, width=20, rows=20) == StepCores(2, 1, 1)
    assert big.step(alone=False, width=1, rows=1) == StepCores(1, 1, 1)
    small = CoreShare.of(spec("w8a16", 1 << 20), threads=1, all_cores=2)
    assert small == CoreShare(1, 2, 1, False)
    assert small.step(alone=True, width=1, rows=1) == StepCores(1, 1, 1)
    assert small.step(alone=True, width=20, rows=20) == StepCores(2, 1, 1)


def test_a_shard_alone_on_its_node_already_has_every_core():
    share = CoreShare.of(spec("w4a8x2"), threads=2, all_cores=2)
    assert share == CoreShare(2, 2, 1, False)
    for alone, width in [(True, 1), (True, 20), (False, 1)]:
        assert share.step(alone=alone, width=width, rows=width) == StepCores(2, 1, 1)
