"""Tier 1: a stage's run-time changes on a tiny random model: grow is all or nothing, a
recompressed stage equals one built at that compression, KV adopted by a fresh stage."""
import pytest
import torch

from shards.compress.spec import CompressionError
from shards.model.source import HFFolderSource
from shards.model.stage import Stage
from shards.model.step import StepBatch
from shards.plan.layer_range import LayerRange

pytestmark = pytest.mark.model

PROMPT = torch.tensor([[5, 9, 2, 7, 1]])


def prefill(stage, sid=0):
    return stage(StepBatch([sid], [0], [5], tokens=PROMPT))


def test_failed_grow_leaves_the_stage_as_it_was(tiny_folder):
    src = HFFolderSource(tiny_folder)
    stage = Stage(src, LayerRange(0, 2), kv_blocks=8)
    prefill(stage)
    real = src.tensor

    def broken(name):
        if name.startswith("model.layers.3."):
            raise OSError("read error on layer 3")
        return real(name)
    src.tensor = broken
    with pytest.raises(OSError, match="layer 3"):
        stage.grow(src, LayerRange(2, 4))
    # before the fix, the range said [0, 4) with only layer 2 loaded: wrong tokens, silently
    assert stage.layers == LayerRange(0, 2) and sorted(stage.blocks) == ["0", "1"]
    assert sorted(stage.kv.pools) == [0, 1]


def test_recompressed_stage_equals_one_built_at_that_compression(tiny_folder):
    src = HFFolderSource(tiny_folder)
    stage = Stage(src, LayerRange(0, 4), kv_blocks=8)
    fp32 = prefill(stage, 1)
    stage.recompress(src, "w8a16")
    assert stage.compression.quant == "w8a16"
    assert torch.equal(prefill(stage, 2), prefill(Stage(src, LayerRange(0, 4), kv_blocks=8, compression="w8a16")))
    assert stage.kv.table.lengths[1] == 5          # live KV kept across the rebuild
    stage.recompress(src, "fp32")
    assert torch.equal(prefill(stage, 3), fp32)
    with pytest.raises(CompressionError, match="quantization only"):
        stage.recompress(src, "w8a16+magnitude:0.5")


def test_new_stage_adopts_the_kv_of_a_split(tiny_folder):
    """Pipeline [0, 3) + [3, 4); split [2, 3) off the first onto a new stage that imports the
    live KV: the next decode step equals the unsplit pipeline's."""
    src = HFFolderSource(tiny_folder)

    def pipeline():
        a, b = Stage(src, LayerRange(0, 3), kv_blocks=8), Stage(src, LayerRange(3, 4), kv_blocks=8)
        b(StepBatch([0], [0], [5]).with_hidden(prefill(a), 3))
        return a, b
    a, b = pipeline()
    a2, b2 = pipeline()
    handoff = a2.shrink(LayerRange(2, 3))
    new = Stage(src, LayerRange(2, 3), kv_blocks=8)
    new.import_kv(handoff["kv"])
    step = StepBatch([0], [5], [1], tokens=torch.tensor([[3]]))
    want = b(step.with_hidden(a(step), 3))
    got = b2(step.with_hidden(new(step.with_hidden(a2(step), 2)), 3))
    assert a2.layers == LayerRange(0, 2) and new.kv.table.lengths[0] == 6
    assert torch.allclose(got, want, atol=1e-5)


def test_a_stage_refuses_a_step_from_a_gap(tiny_folder):
    """A failed rollback can leave the ranges [0, 2) and [3, 4) with layer 2 nowhere: the step
    leaving [0, 2) is at layer 2, and the stage of [3, 4) refuses it (RangeError, no output),
    before touching its KV; the step at layer 3 still runs."""
    from shards.errors import RangeError
    src = HFFolderSource(tiny_folder)
    a, c = Stage(src, LayerRange(0, 2), kv_blocks=8), Stage(src, LayerRange(3, 4), kv_blocks=8)
    hidden = prefill(a)
    with pytest.raises(RangeError, match=r"a step at layer 2 reached the stage of layers \[3, 4\)"):
        c(StepBatch([0], [0], [5]).with_hidden(hidden, 2))
    assert 0 not in c.kv.table.lengths
    assert c(StepBatch([0], [0], [5]).with_hidden(hidden, 3)).shape[0] == 1
