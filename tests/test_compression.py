"""Compression: spec grammar (pure), quantizer error bounds and pruning masks on small
matrices, byte accounting, and real-model perplexity on short windows."""
import os
import subprocess
import sys

import pytest
import torch

from shards.compress.prune import magnitude_mask, two_four_mask
from shards.compress.quantize import quantize_linear
from shards.compress.spec import Compression, CompressionError, parse

pytestmark = pytest.mark.model


def test_spec_grammar_and_presets():
    assert parse("nf4+wanda:0.5") == Compression("nf4", "wanda", 0.5)
    assert parse("w8a16+2:4").prune == "2:4"
    assert parse("cut-mlp:0.2+drop-layers:2") == Compression(cut_mlp=0.2, drop_layers=2)
    assert parse("balanced") == parse("w4a16") and parse("fast").quant == "w4a8x2"
    assert parse("magnitude:0.5").spec == "magnitude:0.5" and parse("fp32").spec == "fp32"
    for bad, msg in [("int3", "unknown compression 'int3'"), ("wanda:1.5", "fraction in"),
                     ("nf4+int8", "sets quant twice"), ("", "empty")]:
        with pytest.raises(CompressionError, match=msg) as e:
            parse(bad)
        assert "valid:" in str(e.value) or msg == "sets quant twice"


@pytest.mark.parametrize("quant,bound", [("bf16", 0.01), ("w8a16", 0.03), ("llm-int8", 0.03),
                                         ("nf4", 0.12), ("fp4", 0.15)])
def test_quantizer_relative_error(quant, bound):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, bias=False)
    x = torch.randn(8, 256)
    ref = lin(x)
    q = quantize_linear(lin, quant)
    rel = ((q(x) - ref).norm() / ref.norm()).item()
    assert rel < bound, f"{quant}: relative error {rel:.4f}"
    assert q(x).dtype == torch.float32


def test_int8_cpu_kernel_by_step_kind_and_batch_invariant():
    """Decode inputs ([B, in], [B, 1, in]): the packed kernel (bf16 activations), bit-for-bit.
    Prefill ([B, Q > 1, in]): an fp32 GEMM on the dequantized weight, chunked over output
    channels, and each row's result does not depend on the rows batched with it."""
    from shards.compress import quantize as q
    torch.manual_seed(0)
    lin = q.Int8CpuLinear(torch.nn.Linear(96, q.DEQUANT_ROWS + 40, bias=False))   # two chunks
    deq = lin.qweight.float() * lin.scales.float()[:, None]
    dec = torch.randn(3, 96)
    packed = torch._weight_int8pack_mm(dec.bfloat16(), lin.qweight, lin.scales).float()
    assert torch.equal(lin(dec), packed) and torch.equal(lin(dec[:, None])[:, 0], packed)
    pre = torch.randn(4, 40, 96)
    got, want = lin(pre), pre @ deq.t()
    assert got.shape == (4, 40, q.DEQUANT_ROWS + 40)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()   # fp32, not bf16 inputs
    for i, j, n in ((0, 1, 2), (0, 1, 7), (1, 3, 20), (2, 3, 40)):             # 2 .. 40 rows
        assert torch.equal(lin(pre[i:j, :n]), got[i:j, :n])


def test_two_level_more_exact_than_bf16_and_batch_invariant():
    """w8a8's down_proj multiplies two int8 levels of its input: on an input with a 100x
    outlier channel its error is under a third of the packed kernel's (bf16 input), and a row's
    bits depend neither on its batch nor on whether the step is a prefill or a decode."""
    from shards.compress import quantize as q
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 576, bias=False)
    two, one = q.Int8CpuLinear(lin, two_level=True), q.Int8CpuLinear(lin)
    x = torch.randn(16, 1536)
    x[:, 7] *= 100
    w = (two.qweight.double() * two.scales.double()[:, None]).t()
    ref = x.double() @ w
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()   # noqa: E731
    assert err(two(x)) < err(one(x)) / 3
    assert torch.equal(two(x[:3]), two(x)[:3]) and torch.equal(two(x[5:6, None])[:, 0], two(x)[5:6])
    assert torch.equal(two(x[None, :8])[0], two(x)[:8])                       # prefill == decode


def test_prefill_gemm_row_invariant_at_any_row_and_thread_count():
    """down_proj's prefill GEMM ([rows, 1536] x [1536, 576], fp32): a row gets the same bits at
    1 .. 200 rows and at 1 or 2 threads. Without MKL's strict mode (shards/__init__.py) MKL splits
    this shape differently at 2 threads for 57 .. 192 rows."""
    from shards.compress import quantize as q
    assert os.environ.get("MKL_CBWR") == "AUTO,STRICT"
    torch.manual_seed(0)
    lin = q.Int8CpuLinear(torch.nn.Linear(1536, 576, bias=False))
    x = torch.randn(1, 200, 1536)
    was = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = lin(x[:, :2])[0, 0]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            bad = [n for n in range(2, 201) if not torch.equal(lin(x[:, :n])[0, 0], ref)]
            assert not bad, f"{threads} thread(s): row 0 changes at {len(bad)} row counts, first {bad[:5]}"
    finally:
        torch.set_num_threads(was)


def test_w8a8_cpu_smoothing_exact_ints_and_batch_invariant():
    """An input channel 100x louder than the rest: smoothing by its calibration maximum cuts the
    error of per-token int8 activations; the int32 products equal a float reference on the same
    codes; a row's output does not depend on its batch (decode or prefill shaped)."""
    from shards.compress.quantize import Int8Embedding, W8A8CpuLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, bias=True)
    x = torch.randn(6, 5, 256)
    x[..., 7] *= 100
    ref = lin(x)
    act_max = x.reshape(-1, 256).abs().amax(0)
    rel = {s: ((q(x) - ref).norm() / ref.norm()).item()
           for s, q in (("plain", W8A8CpuLinear(lin)), ("smooth", W8A8CpuLinear(lin, act_max)))}
    assert rel["smooth"] < 0.02 < rel["plain"] and rel["smooth"] < rel["plain"] / 2, rel
    q = W8A8CpuLinear(lin, act_max)
    x2 = x.reshape(-1, 256) * q.inv_s
    sx = x2.abs().amax(1, keepdim=True) / 127
    codes = torch.round(x2 / sx).clamp(-127, 127)
    want = (codes.double() @ q.qweight.double().t()).float() * sx * q.scales + lin.bias
    assert torch.equal(q(x).reshape(-1, 384), want)
    full = q(x)
    for i, j, n in ((0, 1, 1), (0, 6, 1), (2, 3, 5), (1, 4, 3)):
        assert torch.equal(q(x[i:j, :n]), full[i:j, :n]) and torch.equal(q(x[i:j, 0]), full[i:j, 0])
    # a tied table: W * s stored, rows read back as W (coarser: column 7's s is ~10x the rest)
    emb = Int8Embedding(q)
    assert ((emb(torch.arange(384)) - lin.weight).norm() / lin.weight.norm()).item() < 0.05
    with pytest.raises(CompressionError, match="takes no other compression"):
        parse("w8a8+wanda:0.5")


def test_pruning_masks():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    m = magnitude_mask(w, 0.5)
    assert m.sum(1).eq(32).all()
    for r in range(16):
        assert w[r][~m[r]].abs().max() <= w[r][m[r]].abs().min()
    m24 = two_four_mask(w)
    assert m24.reshape(16, 16, 4).sum(-1).eq(2).all()


def test_import_shards_stays_light():
    code = "import sys, shards, shards.compress.spec, shards.plan.plan, shards.plan.planner; " \
           "print(any(m in sys.modules for m in ('bitsandbytes', 'ray', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_real_model_perplexity_short_windows(source):
    """2 windows of 256 tokens: int8/w8a8/nf4 stay near fp32, magnitude 90% collapses."""
    from shards.compress.perplexity import perplexity
    res = {c: perplexity(source, c, seqlen=256, windows=2)
           for c in ("fp32", "w8a16", "w8a8", "nf4", "magnitude:0.9")}
    base = res["fp32"].ppl
    print({c: round(r.ppl, 2) for c, r in res.items()})
    assert 5 < base < 100
    assert res["w8a16"].ppl < 1.02 * base and res["w8a8"].ppl < 1.02 * base
    assert res["nf4"].ppl < 1.5 * base
    assert res["magnitude:0.9"].ppl > 20 * base
    assert res["nf4"].weight_bytes < 0.35 * res["fp32"].weight_bytes


def test_wanda_mask_keeps_small_weights_on_loud_inputs():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    w[:, 3] = 1e-3                                # tiny weights on input 3 ...
    norms = torch.ones(16)
    norms[3] = 1e6                                # ... which sees huge activations
    assert not magnitude_mask(w, 0.5)[:, 3].any()
    assert magnitude_mask(w, 0.5, norms)[:, 3].all()


def test_calibrated_methods_on_real_model(source):
    """2 windows of 256 tokens, calibration on the prompts: Wanda far better than magnitude at
    50%; cut-mlp and drop-layers shrink bytes and stay usable."""
    from shards.compress.perplexity import perplexity
    specs = ("fp32", "magnitude:0.5", "wanda:0.5", "cut-mlp:0.2", "drop-layers:2")
    res = {c: perplexity(source, c, seqlen=256, windows=2) for c in specs}
    print({c: (round(r.ppl, 2), r.weight_bytes) for c, r in res.items()})
    base = res["fp32"]
    assert res["wanda:0.5"].ppl < res["magnitude:0.5"].ppl / 3
    assert res["wanda:0.5"].ppl < 3 * base.ppl
    assert res["cut-mlp:0.2"].ppl < 2.5 * base.ppl
    # cut-mlp removes the same neurons' rows of gate and up and columns of down in every layer
    # (fp32), and its mean compensation may give down_proj a bias of `hidden` floats
    from shards.compress.cut import MULTIPLE, keep_count
    cfg = source.config
    gone = cfg.intermediate_size - keep_count(cfg.intermediate_size, 0.2, MULTIPLE)
    removed = base.weight_bytes - res["cut-mlp:0.2"].weight_bytes
    assert 0 <= cfg.num_hidden_layers * gone * 3 * cfg.hidden_size * 4 - removed <= cfg.num_hidden_layers * cfg.hidden_size * 4
    assert res["drop-layers:2"].ppl < 2 * base.ppl
    from shards.compress.costs import measure_costs
    layer = measure_costs(source).layer_bytes[0]          # every fp32 layer has the same shapes
    assert base.weight_bytes - res["drop-layers:2"].weight_bytes == 2 * layer


def test_embedding_policy_one_int8_table_for_embedding_and_head(source):
    """Quantized specs store the tied table once as int8 rows: the embedding reads the lm_head's
    rows; rows stay within int8 error; the plan's bytes equal the built stage's."""
    from shards import LayerRange
    from shards.compress.costs import measure_costs
    from shards.compress.quantize import Int8CpuLinear, Int8Embedding
    from shards.model.stage import Stage
    from shards.plan.planner import plan
    st = Stage(source, LayerRange(0, 30), kv_blocks=1, compression="w8a16")
    assert isinstance(st.embed, Int8Embedding) and isinstance(st.lm_head, Int8CpuLinear)
    assert st.embed.table is st.lm_head
    ids = torch.tensor([1, 500, 20000, 49151])
    ref = source.tensor("model.embed_tokens.weight")[ids]
    assert ((st.embed(ids) - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 0.02
    p = plan(measure_costs(source, "w8a16"), 1, None, 0, compression="w8a16")
    fp32 = plan(measure_costs(source), 1, None, 0).shards[0].weight_bytes
    assert p.shards[0].weight_bytes == st.weight_bytes() < 0.26 * fp32
    first = Stage(source, LayerRange(0, 1), kv_blocks=1, compression="fp32")
    assert isinstance(first.embed, torch.nn.Embedding)               # fp32 keeps fp32


def test_w8a8_cpu_stage_maxima_cached_and_bytes_planned(source):
    """w8a8 on the real model: smoothed int8 x int8 projections and lm_head, down_proj
    weight-only; the activation maxima come from the disk cache the second time; the plan's
    bytes equal the built stage's."""

    from shards import LayerRange
    from shards.compress.costs import measure_costs
    from shards.compress.maxima import activation_maxima
    from shards.compress.quantize import Int8CpuLinear, W8A8CpuLinear
    from shards.compress.smoothing import HEAD
    from shards.model.stage import Stage
    from shards.plan.planner import plan
    st = Stage(source, LayerRange(0, 30), kv_blocks=1, compression="w8a8")
    b = st.blocks["0"]
    assert isinstance(st.lm_head, W8A8CpuLinear) and st.embed.table is st.lm_head
    assert isinstance(b.qkv_proj, W8A8CpuLinear) and isinstance(b.down_proj, Int8CpuLinear) and b.down_proj.two_level
    assert not torch.equal(b.qkv_proj.inv_s, torch.ones(576))          # smoothed
    import shards.compress.maxima as maxima_module

    def measured(*_):
        raise AssertionError("the maxima were measured again instead of read from the cache")
    real, maxima_module._measure = maxima_module._measure, measured     # the stage above cached them
    try:
        maxima = activation_maxima(source)
    finally:
        maxima_module._measure = real
    assert set(maxima) == set(range(30)) | {HEAD}
    assert maxima[29]["down_proj"].shape == (1536,) and maxima[HEAD].shape == (576,)
    p = plan(measure_costs(source, "w8a8"), 1, None, 0, compression="w8a8")
    assert p.shards[0].weight_bytes == st.weight_bytes()
