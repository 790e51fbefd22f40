"""Tier 1: the fused decode step (shards/model/fused.py) on tiny random models: a compiled stage of
w4a8x2 or w4a8x1 decodes through one C++ call and builds no graph; its tokens equal the eager
path's, its logits the graph's; it follows a move and leaves for the graph when a recompress
makes a spec it cannot run; inputs outside the pool are refused with their numbers. The real
model's fused path is checked against transformers in test_generator.py and over HTTP in
test_serve.py."""
import pytest
import torch

from shards.model.fused import FusedError
from shards.model.generator import Generator
from shards.model.source import HFFolderSource
from shards.model.stage import Stage
from shards.model.step import SamplingParams, StepBatch
from shards.model.step_context import dummy_decode
from shards.plan.layer_range import LayerRange
from tests.conftest import tokens_after_move_and_recompress

pytestmark = pytest.mark.model

# lengths that cross block boundaries (16 tokens) at different steps, so batches mix KV lengths
PROMPTS = [[3, 1, 4, 1, 5], list(range(1, 30)), [7] * 15, list(range(40, 57))]
# Qwen2.5's layout (biases on q, k and v) at a size a test runs; its vocabulary is the tokenizer's
QWEN_TINY = {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 49152}


@pytest.fixture(scope="module")
def src(tiny_folder):
    return HFFolderSource(tiny_folder)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from shards.model.synth import synth
    return HFFolderSource(synth("qwen2.5-14b", tmp_path_factory.mktemp("qwen-tiny"), "bfloat16", 3, QWEN_TINY))


def _decode_logits(gen: Generator) -> torch.Tensor:
    """A prefill of PROMPTS[0], then one decode step's logits."""
    step = StepBatch([0], [0], [5], tokens=torch.tensor([PROMPTS[0]]))
    dec = StepBatch([0], [5], [1], tokens=gen.step(step).argmax(-1, keepdim=True))
    return gen.step(dec)


@pytest.mark.parametrize("model, spec", [("llama", "w4a8x2"), ("qwen", "w4a8x2"),
                                         ("llama", "w4a8x2+cut-heads:0.5+cut-mlp:0.25")])
def test_fused_greedy_equals_eager(src, qwen, model, spec, monkeypatch):
    """Cuts leave fewer heads and a narrower MLP in each layer: the table carries each layer's."""
    source = src if model == "llama" else qwen
    # the tiny model has no tokenizer: cuts calibrate on random ids instead
    monkeypatch.setattr(source, "tokenizer", lambda: None)
    monkeypatch.setattr("shards.compress.calibration.calibration_ids",
                        lambda tok, data=None, gptq=False: torch.arange(128).view(4, 32))
    eager = Generator(source, 2, kv_blocks=32, compression=spec)
    fused = Generator(source, 2, kv_blocks=32, compression=spec, compile=True)
    assert all(s.runs_fused and s.compiled is None for s in fused.stages)     # no graph built
    assert not any(s.runs_fused for s in eager.stages)
    want = eager.generate(PROMPTS, SamplingParams(max_tokens=24), stop_at_eos=False)
    assert fused.generate(PROMPTS, SamplingParams(max_tokens=24), stop_at_eos=False) == want
    # batches of 1-4 sequences; one decode step per generated token after the first, per stage
    assert all(s.fused_steps >= 23 for s in fused.stages)


@pytest.mark.parametrize("model, spec", [("llama", "w4a8x2"), ("llama", "w4a8x1"), ("qwen", "w4a8x2")])
def test_fused_logits_equal_the_graphs_bit_for_bit(src, qwen, model, spec, monkeypatch):
    source = src if model == "llama" else qwen
    got = _decode_logits(Generator(source, 2, kv_blocks=32, compression=spec, compile=True))
    monkeypatch.setattr("shards.model.fused.ON", False)
    graph = Generator(source, 2, kv_blocks=32, compression=spec, compile=True)
    assert not any(s.runs_fused for s in graph.stages) and all(s.compiled.steps == 0 for s in graph.stages)
    ref = _decode_logits(graph)
    assert all(s.compiled.steps == 1 for s in graph.stages)
    # the same kernels and the same elementwise arithmetic: the same bits, even where one level of
    # int8 activations turns a last-bit difference of a norm into a visible one
    assert torch.equal(got, ref)


def test_fused_follows_a_move_and_leaves_for_the_graph_on_a_recompress(src):
    """Layers [0, 2) + [2, 4) -> [0, 3) + [3, 4), then the second at w8a16 (not a group kernel's
    spec): the next tokens equal an eager pipeline's after the same changes."""
    pipes = [[Stage(src, r, kv_blocks=16, compression="w4a8x2", compile=c) for r in (LayerRange(0, 2), LayerRange(2, 4))]
             for c in (False, True)]
    outs = [tokens_after_move_and_recompress(src, a, b, PROMPTS[0]) for a, b in pipes]
    assert outs[0] == outs[1]
    a, b = pipes[1]
    assert a.runs_fused and len(a._fused_decode().blocks) == 3 and a.fused_steps == 6
    assert not b.runs_fused and b.compiled.steps == 6 and b.fused_steps == 0


def test_inputs_outside_the_pool_are_refused_with_their_numbers(src):
    stage = Stage(src, LayerRange(0, 2), kv_blocks=4, compression="w4a8x2", compile=True)   # 5 blocks: 80 slots
    fused = stage._fused_decode()

    def call(slots=None, lens=None):
        x, s, ids, _, n, cos, sin = dummy_decode(2, 3, 64, 16, 4, 16, torch.float32, "cpu")
        fused(x, s if slots is None else torch.tensor(slots), ids, n if lens is None else torch.tensor(lens),
              cos[:, 0], sin[:, 0])
    call()
    with pytest.raises(FusedError, match=r"slots \[64, 80\] outside the KV pool's 80 slots"):
        call(slots=[64, 80])
    with pytest.raises(FusedError, match=r"layer 0: attention refused lengths \[16, 49\] over 3 blocks"):
        call(lens=[16, 49])


def test_norm_and_swiglu_are_the_graphs_bit_for_bit():
    """fused.cpp's RMSNorm against inductor's kernel for the same expression, and its SwiGLU
    against torch's silu(gate) * up, on rows of the widths served (hidden, intermediate)."""
    import ctypes

    import torch.nn.functional as F

    from shards.model import fused
    lib = fused._library()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.fused_rms_norm.argtypes = [p, p, ctypes.c_float, p, i64, i64]
    lib.fused_swiglu.argtypes = [p, p, i64, i64]
    torch.manual_seed(0)
    for n in (64, 576, 2048):
        x, w = torch.randn(8, n) * 3, torch.randn(n)
        got = torch.empty_like(x)
        lib.fused_rms_norm(x.data_ptr(), w.data_ptr(), 1e-6, got.data_ptr(), 8, n)
        graph = torch.compile(lambda x, w: w * F.rms_norm(x, (x.shape[-1],), eps=1e-6), dynamic=False)
        assert torch.equal(got, graph(x, w))
        gu, act = torch.randn(8, 2 * n) * 4, torch.empty(8, n)
        lib.fused_swiglu(gu.data_ptr(), act.data_ptr(), 8, n)
        gate, up = gu.chunk(2, -1)
        assert torch.equal(act, F.silu(gate) * up)
