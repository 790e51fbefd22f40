"""Tier 1: the compiled decode step (shards/model/compiled.py) on a tiny random model: the same tokens
as the eager path, no compile at request time (it raises instead), and it follows run-time
changes of the stage. The real model's compiled path is checked against transformers in
test_generator.py and over HTTP in test_serve.py."""
import pytest
import torch

from shards.model.generator import Generator
from shards.model.source import HFFolderSource
from shards.model.stage import Stage
from shards.model.step import SamplingParams, StepBatch
from shards.plan.layer_range import LayerRange
from tests.conftest import tokens_after_move_and_recompress

pytestmark = pytest.mark.model


@pytest.fixture(autouse=True)
def graph_only(monkeypatch):
    """These are the graph's tests: w4a8x2's stages decode through it, not fused
    (tests/test_fused.py has those)."""
    monkeypatch.setattr("shards.model.fused.ON", False)

# lengths that cross block boundaries (16 tokens) at different steps, so batches mix KV lengths
PROMPTS = [[3, 1, 4, 1, 5], list(range(1, 30)), [7] * 15, list(range(40, 57))]


def graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def src(tiny_folder):
    return HFFolderSource(tiny_folder)


@pytest.mark.parametrize("compression, kernel", [("fp32", True), ("w8a16", True), ("w8a8", True),
                                                 ("w4a8x2", True), ("fp32", False)])
def test_compiled_greedy_equals_eager(src, compression, kernel, monkeypatch):
    """kernel: decode attention through shards/model/attention.py's kernel, else (as on CUDA or
    without a compiler) the gather path eagerly and inductor's reductions compiled."""
    if not kernel:
        monkeypatch.setattr("shards.model.attention.supports", lambda *a: False)
    # the tiny model has no tokenizer: w8a8's smoothing calibrates on random ids instead
    monkeypatch.setattr(src, "tokenizer", lambda: None)
    monkeypatch.setattr("shards.compress.calibration.calibration_ids",
                        lambda tok, data=None, gptq=False: torch.arange(128).view(4, 32))
    eager = Generator(src, 2, kv_blocks=32, compression=compression)
    compiled = Generator(src, 2, kv_blocks=32, compression=compression, compile=True)
    assert all(s.runs_compiled for s in compiled.stages) and not any(s.runs_compiled for s in eager.stages)
    # decode steps call the whole-stage graphs' bytecode, bound at each kind's first step,
    # never through dynamo
    for s in compiled.stages:
        monkeypatch.setattr(s.compiled, "stage_fn", _through_dynamo)
    want = eager.generate(PROMPTS, SamplingParams(max_tokens=24), stop_at_eos=False)
    before = graphs()
    got = compiled.generate(PROMPTS, SamplingParams(max_tokens=24), stop_at_eos=False)
    assert got == want
    assert graphs() == before          # batches of 1-4 sequences over 1-4 blocks: all warmed
    # one decode step, both paths, on the same KV: the same logits up to summation order
    step = StepBatch([0], [0], [5], tokens=torch.tensor([PROMPTS[0]]))
    compiled.step(step)
    dec = StepBatch([0], [5], [1], tokens=eager.step(step).argmax(-1, keepdim=True))
    assert (eager.step(dec) - compiled.step(dec)).abs().max().item() < (1e-4 if compression == "fp32" else 0.1)
    t = torch.get_num_threads()
    assert all(set(s.compiled.direct) == {("whole", 0, True, t), ("whole", 0, False, t)} for s in compiled.stages)


def _through_dynamo(*args):
    raise AssertionError("a decode step went through dynamo's lookup")


def test_a_step_needing_a_new_graph_raises_instead_of_compiling(src):
    stage = Stage(src, LayerRange(0, 4), kv_blocks=8, compile=True, threads=(1,))
    stage(StepBatch([0], [0], [5], tokens=torch.tensor([PROMPTS[0]])))
    was = torch.get_num_threads()
    torch.set_num_threads(3)           # graphs are traced per thread count: none for 3 here
    try:
        # the message says which stance caught it: all guards, or only those telling graphs apart
        with pytest.raises(RuntimeError, match="fail_on_recompile|Recompilation triggered with skip_guard_eval_unsafe"):
            stage(StepBatch([0], [5], [1], tokens=torch.tensor([[3]])))
        # no cache entry fits: remembered, and the next such step goes through dynamo again
        assert stage.compiled.direct == {("whole", 0, True, 3): False}
        with pytest.raises(RuntimeError, match="fail_on_recompile|Recompilation triggered with skip_guard_eval_unsafe"):
            stage(StepBatch([0], [5], [1], tokens=torch.tensor([[3]])))
    finally:
        torch.set_num_threads(was)


def test_compiled_stages_follow_a_move_and_a_recompress(src):
    """Layers [0, 2) + [2, 4) -> [0, 3) + [3, 4), then the second at w8a16: the compiled
    pipeline's next tokens equal an eager pipeline's after the same changes."""
    pipes = [[Stage(src, r, kv_blocks=16, compile=c) for r in (LayerRange(0, 2), LayerRange(2, 4))]
             for c in (False, True)]

    outs = []
    for a, b in pipes:
        steps = b.compiled.steps if b.compiled else 0
        outs.append(tokens_after_move_and_recompress(src, a, b, PROMPTS[0]))
        assert a.layers == LayerRange(0, 3) and b.compression.quant == "w8a16"
    assert outs[0] == outs[1]
    a, b = pipes[1]
    assert a.runs_compiled and b.runs_compiled and b.compiled.steps == steps + 6   # not eager


def test_a_failed_compile_says_how_to_serve_without(src):
    """No C++ compiler on the node (inductor builds its CPU kernels with one): the shard fails
    at load with the way out, not at the first request."""
    import torch._inductor.config as inductor

    from shards.model.compiled import CompileError
    # config.patch restores the setting after (monkeypatch's undo deletes it from the config)
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",)}), \
            pytest.raises(CompileError, match="InvalidCxxCompiler.*--no-compile"):
        Stage(src, LayerRange(0, 2), kv_blocks=8, compile=True, threads=(7,))   # 7: no cached graph
    # the compiler restored, the same graphs compile (a later test would otherwise fail to)
    # a layer graph and the whole stage's (2 layers in one call), each for batch 1 and more
    assert Stage(src, LayerRange(0, 2), kv_blocks=8, compile=True, threads=(7,)).compiled.graphs == 4


def test_chunks_of_layers_equal_eager_and_follow_a_move(src, monkeypatch):
    """Runs of CHUNK layers take one graph call (here CHUNK 2): [0, 3) runs as one graph of its
    3 layers, then a move makes it [0, 2) (a chunk) and [2, 4) (a chunk, where that stage's whole
    graph was of 1 layer); tokens equal eager stages', and decode compiles nothing after the
    warm-up."""
    monkeypatch.setattr("shards.model.compiled.CHUNK", 2)
    pipes = [[Stage(src, r, kv_blocks=16, compile=c, threads=(5,)) for r in (LayerRange(0, 3), LayerRange(3, 4))]
             for c in (False, True)]
    # 5 threads: graphs no earlier test built; a layer, a chunk and a 3-layer graph, each for
    # batch 1 and more
    assert pipes[1][0].compiled.graphs == 6 and pipes[1][0].compiled.whole == 3
    assert not pipes[1][0].compiled.direct     # bound at each call's first step

    def step(stages, batch):
        x = None
        for s in stages:
            x = s(batch if x is None else batch.with_hidden(x, s.layers.start))
        return x
    outs, was = [], torch.get_num_threads()
    torch.set_num_threads(5)
    try:
        for a, b in pipes:
            logits = step((a, b), StepBatch([0, 1], [0, 0], [5, 5], tokens=torch.tensor([PROMPTS[0], PROMPTS[2][:5]])))
            toks = []
            for i in range(8):
                if i == 3:
                    b.grow(src, LayerRange(2, 3), **a.shrink(LayerRange(2, 3)))
                toks.append(logits.argmax(-1).tolist())
                before = graphs()
                logits = step((a, b), StepBatch([0, 1], [5 + i] * 2, [1, 1], tokens=torch.tensor(toks[-1]).unsqueeze(1)))
                assert graphs() == before
            outs.append(toks)
    finally:
        torch.set_num_threads(was)
    assert outs[0] == outs[1] and pipes[1][1].layers == LayerRange(2, 4)
    assert pipes[1][0].compiled.whole is None and pipes[1][1].compiled.whole is None   # chunks since the move
    # since the move, each stage's chunk call is bound for direct calls, not its old whole graph
    assert set(pipes[1][0].compiled.direct) == {("chunk", 0, False, 5)}
    assert set(pipes[1][1].compiled.direct) == {("chunk", 0, False, 5)}
