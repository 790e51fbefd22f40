"""Structured cuts on small random blocks (shapes shrink, the right units go, GQA kept), layer
drops across a live layer move, and a prepared artifact round trip on the real model."""
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig

from shards.compress.cut import cut_heads, cut_mlp, keep_count, layers_to_drop
from shards.compress.spec import CompressionError
from shards.model.block import Block
from shards.plan.layer_range import LayerRange

pytestmark = pytest.mark.model

CFG = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=1, vocab_size=32)


def block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    p = "model.layers.0."
    t = {p + "input_layernorm.weight": torch.ones(64), p + "post_attention_layernorm.weight": torch.ones(64)}
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
              "mlp.down_proj": (64, 128)}
    t.update({p + k + ".weight": torch.randn(*s) / 8 for k, s in shapes.items()})
    return Block(t, CFG, 0)


def mlp(b: Block, h: torch.Tensor) -> torch.Tensor:
    gate, up = b.gate_up_proj(h).chunk(2, dim=-1)
    return b.down_proj(torch.nn.functional.silu(gate) * up)


def test_cut_mlp_drops_the_quiet_neurons_and_shrinks():
    b = block()
    norms = torch.ones(128)
    quiet = torch.arange(0, 128, 4)                 # 32 neurons that never fire
    norms[quiet] = 0
    keep = cut_mlp(b, 0.25, norms, means=torch.zeros(128))
    assert len(keep) == 96 and not set(quiet.tolist()) & set(keep.tolist())
    assert b.gate_up_proj.weight.shape == (192, 64)
    assert b.down_proj.weight.shape == (64, 96) and b.down_proj.bias.abs().max() == 0


def test_cut_mlp_mean_compensation_restores_a_constant_neuron():
    h = torch.randn(5, 64)
    h[:, 0] = 1.0                                   # a constant input feature
    blocks = [block() for _ in range(3)]
    for m in blocks:                                # neuron 7 reads only that feature: constant output
        w = m.gate_up_proj.weight.data
        w[7], w[128 + 7] = 0, 0
        w[7, 0], w[128 + 7, 0] = 2.0, 1.5
    ref, comp, plain = blocks
    gate, up = ref.gate_up_proj(h).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up       # [5, 128]
    norms = torch.ones(128)
    norms[7] = 0                                    # ranked least important: it is the one cut
    cut_mlp(comp, 1 / 128 + 1e-6, norms, means=act.mean(0))
    cut_mlp(plain, 1 / 128 + 1e-6, norms)
    assert comp.gate_up_proj.weight.shape[0] == 240  # 120 kept (a multiple of 8)
    lost = (mlp(plain, h) - mlp(ref, h)).abs().max()
    kept = (mlp(comp, h) - mlp(ref, h)).abs().max()
    assert kept < 0.5 * lost


def test_cut_heads_respects_kv_groups():
    b = block()
    norms = torch.ones(64)
    norms[0:16] = 0                                 # head 0 (group 0) silent
    norms[48:64] = 0                                # head 3 (group 1) silent
    keep = cut_heads(b, 0.5, norms)
    assert keep.view(2, 16)[:, 0].tolist() == [16, 32]  # heads 1 and 2: one per group
    assert b.qkv_proj.weight.shape == (32 + 2 * 32, 64) and b.o_proj.weight.shape == (64, 32)
    assert (b.n_heads, b.n_kv) == (2, 2)
    from shards.model.kv_cache import PagedKV
    from shards.model.rope import Rope
    from shards.model.step import StepBatch
    from shards.model.step_context import StepContext
    kv = PagedKV([0], 4, 16, 2, 16)
    ctx = StepContext(StepBatch([0], [0], [5]), kv, Rope.of(CFG, kv.dtype, "cpu"))
    assert b(torch.randn(1, 5, 64), ctx.rope, kv, ctx).shape == (1, 5, 64)
    with pytest.raises(CompressionError, match="per KV group"):
        cut_heads(block(), 0.1)


def test_layer_drop_ranking_and_bounds():
    assert layers_to_drop({3: 0.9, 4: 0.99, 5: 0.5, 6: 0.95}, 2) == [4, 6]
    with pytest.raises(CompressionError, match="must leave at least one"):
        layers_to_drop({0: 0.5}, 1)
    assert keep_count(1536, 0.2, 8) == 1224
    with pytest.raises(CompressionError):
        keep_count(16, 0.6, 8)             # would keep 6 -> 0 after rounding to 8s


def test_dropped_layer_stays_dropped_across_a_move(tiny_folder, tmp_path):
    """Prepared tiny model with layer 1 dropped: move [1, 2) from shard 0 to 1 mid-generation;
    the receiving shard does not load it, and greedy output matches the unmoved pipeline."""
    from shards.model.generator import Generator
    from shards.model.source import HFFolderSource
    from shards.model.step import StepBatch
    folder = tmp_path / "tiny-drop"
    shutil.copytree(tiny_folder, folder)
    (folder / "manifest.json").write_text(json.dumps({"compression": "drop-layers:1", "dropped_layers": [1]}))
    src = HFFolderSource(folder)
    gen = Generator(src, [LayerRange(0, 2), LayerRange(2, 4)], kv_blocks=8)
    ref = Generator(src, 1, kv_blocks=8)
    assert sorted(gen.stages[0].blocks) == ["0"] and gen.stages[0].dropped == {1}
    prompt = torch.tensor([[5, 9, 2, 7, 1]])

    def run(g, moved):
        g.step(StepBatch([0], [0], [5], tokens=prompt))
        if moved:
            handoff = g.stages[0].shrink(LayerRange(1, 2))
            assert handoff["dropped"] == [1]
            g.stages[1].grow(src, LayerRange(1, 2), handoff["kv"], handoff["dropped"])
        out = g.step(StepBatch([0], [5], [1], tokens=torch.tensor([[3]])))
        g.free(0)
        return out
    assert torch.allclose(run(ref, False), run(gen, True), atol=1e-5)
    assert gen.stages[1].layers == LayerRange(1, 4) and "1" not in gen.stages[1].blocks


def test_prepared_artifact_round_trip(source, tmp_path):
    """prepare writes weights + manifest; the artifact serves the same logits as compressing at
    load, takes a quantization on top, and refuses a different structure."""
    from shards.compress.artifact import prepare
    from shards.model.source import open_source
    from shards.model.stage import Stage
    out = tmp_path / "art"
    m = prepare(source, "cut-mlp:0.2+drop-layers:1", out, seqlen=128, windows=1)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == m and len(m["dropped_layers"]) == 1 and m["calibration"]["data"] == "prompts-500.jsonl"
    assert m["layer_shapes"]["0"]["mlp"] == 1224 and len(m["layer_bytes"]) == 30 and 1 < m["ppl"]["ppl"] < 200
    art = open_source(str(out))
    whole = LayerRange(0, 30)
    a = Stage(art, whole, kv_blocks=2)
    b = Stage(source, whole, kv_blocks=2, compression="cut-mlp:0.2+drop-layers:1")
    from shards.model.step import StepBatch
    batch = StepBatch([0], [0], [20], tokens=torch.arange(100, 120).unsqueeze(0))
    assert a.dropped == b.dropped and (a(batch) - b(batch)).abs().max() < 1e-4
    assert a.weight_bytes() == m["weight_bytes"]
    q = Stage(art, whole, kv_blocks=2, compression="w8a16")
    assert q.compression.spec == "w8a16+cut-mlp:0.2+drop-layers:1" and q.weight_bytes() < 0.5 * a.weight_bytes()
    # w8a8 smooths with the artifact's own activation maxima (its cut MLPs, its dropped layer)
    w = Stage(art, whole, kv_blocks=2, compression="w8a8")
    assert w.compression.spec == "w8a8+cut-mlp:0.2+drop-layers:1"
    assert w.blocks["0"].gate_up_proj.inv_s.shape == (576,) and w.blocks["0"].down_proj.qweight.shape == (576, 1224)
    ref, got = a(batch), w(batch)
    assert ((got - ref).norm() / ref.norm()).item() < 0.1 and torch.equal(got.argmax(-1), ref.argmax(-1))
    with pytest.raises(CompressionError, match="prepared with cut-mlp:0.2"):
        Stage(art, whole, kv_blocks=2, compression="wanda:0.5")
