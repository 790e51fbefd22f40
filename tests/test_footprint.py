"""The plan's footprint of a shard process (shards/plan/footprint.py): its parts, how budgets and
placement use them, and the load-peak bound measured on a synthetic model."""
import subprocess
import sys

import pytest

from shards import LayerRange, PlanError
from shards.plan.footprint import DEQUANT_BYTES, Overheads, dequantized_bytes, footprint, workspace_bytes
from shards.plan.memory import ModelCosts
from shards.plan.placement import Node, place
from shards.plan.plan import MiB
from shards.plan.planner import plan

OV = Overheads(runtime_bytes=393 * MiB, compiled_bytes=57 * MiB, compiled_layer_bytes=6 * MiB)


def costs_1b(layer=58 * MiB) -> ModelCosts:
    """Llama-3.2-1B's shape, its layers at w4a8x2's measured size."""
    return ModelCosts("1b", 16, (layer,) * 16, 260 * MiB, 8192, 260 * MiB, True, 32768, 8.0,
                      hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256,
                      source_layer_bytes=232 * MiB)


@pytest.mark.unit
def test_the_parts_add_up_and_a_budget_leaves_out_the_runtime():
    c = costs_1b()
    f = footprint(c, LayerRange(10, 16), 499 * MiB, 192 * MiB, OV)
    assert f.compiled == (57 + 6 * 6) * MiB
    assert f.held == f.weights + f.kv + f.compiled + f.workspace
    assert f.total == f.runtime + f.held and f.at_rest == f.total - f.workspace
    assert f.load_peak == f.at_rest + 232 * MiB       # one fp32 layer being built
    assert footprint(c, LayerRange(10, 16), 0, 0, Overheads()).compiled == 0     # compile off


@pytest.mark.unit
def test_workspace_follows_step_sizes_and_ends():
    c = costs_1b()
    mid, last, first = LayerRange(4, 8), LayerRange(8, 16), LayerRange(0, 8)
    small, big = Overheads(max_batch=8, prefill_tokens=128), Overheads(max_batch=32, prefill_tokens=512)
    assert workspace_bytes(c, mid, big) > workspace_bytes(c, mid, small)
    # the last shard pays logits, their softmax and top-p's sorted copy for every decode row
    assert workspace_bytes(c, last, small) - workspace_bytes(c, mid, small) == 3 * 4 * 8 * 128256
    assert workspace_bytes(c, first, small) - workspace_bytes(c, mid, small) == 4 * 128 * 2048
    # a method that dequantizes a whole projection per step (bitsandbytes) pays gate|up in fp32
    whole = Overheads(max_batch=8, prefill_tokens=128, dequantizes="whole")
    assert workspace_bytes(c, mid, whole) - workspace_bytes(c, mid, small) == 4 * 2048 * 2 * 8192
    assert dequantized_bytes(c, "block") == DEQUANT_BYTES


@pytest.mark.unit
def test_a_budget_pays_graphs_and_workspace_before_kv():
    c = costs_1b()
    budget = 2048 * MiB
    bare, full = plan(c, 2, [budget] * 2), plan(c, 2, [budget] * 2, overheads=OV)
    for b, f in zip(bare.shards, full.shards):
        assert b.layers == f.layers and f.footprint.held <= budget
        # what the graphs and workspace take comes out of the KV pool, byte for byte
        assert b.kv_bytes - f.kv_bytes == f.compiled_bytes + f.workspace_bytes - b.workspace_bytes


@pytest.mark.unit
def test_placement_counts_each_shards_runtime():
    """Two nodes whose memory holds the layers and KV, but not two runtimes besides: refused,
    and the message names the runtime."""
    c = costs_1b()
    weights_kv = plan(c, 2, kv_tokens=1024)
    need = max(s.weight_bytes + s.kv_bytes for s in weights_kv.shards)
    nodes = [Node(f"n{k}", f"10.0.0.{k}", need + 200 * MiB, cpus=2) for k in range(2)]
    place(c, nodes, 2, 1024, "w4a8x2")     # without runtimes, it fits
    with pytest.raises(PlanError, match="393 MiB of runtime"):
        place(c, nodes, 2, 1024, "w4a8x2", overheads=OV)


# a synthetic model whose layers are big enough for a transient to show (58 MiB in fp32)
SHAPE = {"num_hidden_layers": 4, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 49152}
# loads layers [a, b) of the folder at a spec in a fresh process, its imports before the
# baseline; prints the at-rest RSS growth and the load's peak growth
LOAD = """
import sys
from shards.compress.spec import parse
from shards.runtime.actor import _keep_step_heap, _own_mmaps, peak_rss, private_rss
from shards.model.source import open_source
from shards.model.stage import Stage
from shards.plan.layer_range import LayerRange
folder, spec, a, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
source = open_source(folder)
if parse(spec).method.bitsandbytes:
    import bitsandbytes
_keep_step_heap()
open("/proc/self/clear_refs", "w").write("5")
base = private_rss()
with _own_mmaps():
    stage = Stage(source, LayerRange(a, b), 4, 16, compression=spec, compile=False)
print(private_rss() - base, peak_rss() - base)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from shards.model.synth import synth
    return synth("llama-3.2-1b", tmp_path_factory.mktemp("footprint") / "m", "bfloat16", 3, SHAPE)


@pytest.mark.model
@pytest.mark.parametrize("spec", ["fp32", "bf16", "w8a16", "w4a8x2", "w4a16", "nf4"])
@pytest.mark.parametrize("layers", [(1, 3), (0, 4)], ids=["middle", "whole"])
def test_load_peak_stays_within_the_planned_transient(folder, spec, layers):
    """Loading holds at most the finished layers plus `load_layers` fp32 layers of the one
    being built: each projection is quantized as soon as it is fused, a block of rows at a
    time; lm_head is quantized a block of rows at a time too."""
    from shards.compress.registry import method
    from shards.model.source import open_source
    cfg = open_source(str(folder)).config
    hd = cfg.head_dim
    layer = 4 * cfg.hidden_size * (3 * cfg.intermediate_size + hd * (2 * cfg.num_attention_heads
                                                                     + 2 * cfg.num_key_value_heads))
    out = subprocess.run([sys.executable, "-c", LOAD, str(folder), spec, *map(str, layers)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rest, peak = map(int, out.stdout.split()[-2:])
    bound = method(spec).load_layers * layer
    print(f"{spec} {layers}: at rest +{rest / MiB:.0f} MiB, load peak +{peak / MiB:.0f}, transient "
          f"{(peak - rest) / MiB:.0f} MiB, bound {bound / MiB:.0f} ({method(spec).load_layers} x {layer / MiB:.0f} MiB)")
    assert peak - rest <= bound


@pytest.mark.unit
def test_alone_decode_steps_take_every_core_by_threads_or_the_kernel_team(monkeypatch):
    """shards/runtime/cores.py::decodes_alone: 256 MiB of weights and up, CPU only, and not where
    the 4-bit kernel's team takes the cores instead (kernel_team: any size, CPU only, unless
    turned off); the bench's override of the threshold is read each time."""
    from shards.plan.layer_range import LayerRange
    from shards.plan.plan import ShardSpec
    from shards.runtime import cores
    monkeypatch.delenv("SHARDSERVE_ALONE_DECODE_BYTES", raising=False)
    big = cores.ALONE_DECODE_BYTES
    spec = lambda b, dev="cpu", c="fp32": ShardSpec(0, LayerRange(0, 4), weight_bytes=b, compression=c, device=dev)  # noqa: E731
    assert cores.decodes_alone(spec(big)) and not cores.decodes_alone(spec(big - 1))
    assert not cores.decodes_alone(spec(8 << 30, "cuda:0"))
    assert cores.kernel_team(spec(big, c="fast")) and not cores.decodes_alone(spec(big, c="w4a8x2"))
    assert cores.kernel_team(spec(1, c="fast")) and not cores.decodes_alone(spec(big - 1, c="fast"))
    assert not cores.kernel_team(spec(big, c="w8a16")) and not cores.kernel_team(spec(1, "cuda:0", "w4a8x2"))
    monkeypatch.setattr(cores, "KERNEL_TEAM", False)
    assert not cores.kernel_team(spec(big, c="w4a8x2")) and cores.decodes_alone(spec(big, c="w4a8x2"))
    monkeypatch.setenv("SHARDSERVE_ALONE_DECODE_BYTES", "0")
    assert cores.decodes_alone(spec(1))
    monkeypatch.setattr(cores, "KERNEL_TEAM", True)
    assert cores.kernel_team(spec(1, c="w4a8x2")) and not cores.decodes_alone(spec(1, c="w4a8x2"))
