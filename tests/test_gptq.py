"""GPTQ on synthetic layers (pure torch): lower output error than round-to-nearest on the same
calibration data, and every compensated weight exactly where the serving kernel puts it."""
import pytest
import torch

from shards.compress.gptq import gptq_, grid_for
from shards.compress.quantize import linear, quantize_linear

pytestmark = pytest.mark.model

QUANTS = ["w8a16", "w4a16", "nf4"]


def layer(out=64, inp=256, tokens=2048, seed=0):
    """A weight and correlated calibration inputs (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) / inp ** 0.5
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    x = torch.randn(tokens, inp, generator=g) @ mix
    return w, x


def output_error(w_q, w, x) -> float:
    return ((x @ (w_q - w).T) ** 2).mean().item()


@pytest.mark.parametrize("quant", QUANTS)
def test_gptq_beats_round_to_nearest_on_layer_output(quant):
    w, x = layer()
    grid = grid_for(w, quant)
    rtn = torch.stack([grid.column(j, w[:, j]) for j in range(w.shape[1])], 1)
    q = gptq_(w.clone(), x.T @ x, x.shape[0], grid, damp=0.01)
    e_rtn, e_gptq = output_error(rtn, w, x), output_error(q, w, x)
    print(f"{quant}: output MSE rtn {e_rtn:.3e}, gptq {e_gptq:.3e}")
    assert e_gptq < 0.8 * e_rtn


@pytest.mark.parametrize("quant", QUANTS)
def test_kernel_computes_with_exactly_the_gptq_weights(quant):
    w, x = layer(out=64, inp=128, tokens=512, seed=1)
    grid = grid_for(w, quant)
    q = gptq_(w.clone(), x.T @ x, x.shape[0], grid, damp=0.01)
    module = quantize_linear(linear(q.clone()), quant, grid)
    got = _kernel_weight(module, quant)
    # bf16 outputs of the int4/int8 kernels round the product: compare at bf16's resolution
    tol = 0 if quant == "nf4" else 2 ** -8
    assert torch.allclose(got, q, rtol=tol, atol=1e-7)
    assert (got != 0).any()


def _kernel_weight(module, quant) -> torch.Tensor:
    if quant == "w4a16":
        return module.dequantized()
    if quant == "w8a16":
        return module(torch.eye(module.qweight.shape[1])).T
    import bitsandbytes.functional as bnbf
    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


def test_grid_column_is_round_to_nearest_without_compensation():
    w, _ = layer(out=16, inp=64, seed=2)
    grid = grid_for(w, "w4a16")
    on = torch.stack([grid.column(j, w[:, j]) for j in range(64)], 1)
    # every value is within half a step of its original
    step = grid.scale.repeat_interleave(32, dim=1)
    assert ((on - w).abs() <= step / 2 + 1e-6).all()


def test_prepared_gptq_artifact_serves_the_calibrated_codes(source, tmp_path):
    """prepare nf4+gptq stores the on-grid weights and their grids (bitsandbytes' QuantState
    included); a stage of the artifact computes with exactly those weights, calibrating nothing.
    Calibrated on a file that is the evaluation text: the manifest's evaluated window is skipped."""
    import json

    import bitsandbytes.functional as bnbf

    import shards.compress.calibration as cal
    from shards.compress.artifact import prepare
    from shards.data import WIKITEXT
    from shards.model.source import open_source
    from shards.model.stage import Stage
    from shards.plan.layer_range import LayerRange
    out = tmp_path / "art"
    m = prepare(source, "nf4+gptq", out, seqlen=128, windows=1,
                calibration=cal.CalibrationData(str(WIKITEXT), tokens=2048))
    assert m["gptq"]["quant"] == "nf4"
    assert m["calibration"] == {"data": WIKITEXT.name, "sequences": 8, "seqlen": 256, "skip_tokens": 128}
    assert json.loads((out / "manifest.json").read_text())["compression"] == "nf4+gptq"
    art = open_source(str(out))
    calls = []
    real = cal.calibrated_blocks
    cal.calibrated_blocks = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        stage = Stage(art, LayerRange(0, 3), kv_blocks=2)
    finally:
        cal.calibrated_blocks = real
    assert not calls and stage.compression.spec == "nf4+gptq"
    for layer in range(3):
        w = stage.blocks[str(layer)].down_proj.weight
        got = bnbf.dequantize_4bit(w.data, w.quant_state).float()
        assert torch.equal(got, art.tensor(f"model.layers.{layer}.mlp.down_proj.weight"))
        # GPTQ's mean correction travels as the residual writers' biases
        assert torch.equal(stage.blocks[str(layer)].down_proj.bias, art.tensor(f"model.layers.{layer}.mlp.down_proj.bias"))


def test_group_grids_refuse_widths_off_their_groups():
    from shards.compress.spec import CompressionError
    w = torch.randn(16, 40)
    for quant in ("w4a16", "nf4"):
        with pytest.raises(CompressionError, match="divisible by 32.*got 40"):
            grid_for(w, quant)
    grid_for(w, "w8a16")


def test_mean_correction_removes_the_output_mean_shift():
    """correct_means gives o_proj and down_proj the bias that cancels the mean of their output
    error on inputs with a mean (as activations have), in block order; an unchanged weight
    gets none."""
    from types import SimpleNamespace

    from shards.compress.calibration import correct_means
    from shards.compress.structure import Stats
    w, x = layer(inp=256)
    x = x + torch.linspace(-1, 2, 256)                         # inputs with a mean
    block = SimpleNamespace(o_proj=linear(w.clone()), down_proj=linear(w.clone()))
    before = {"o_proj": w.clone(), "down_proj": w.clone()}
    gptq_(block.o_proj.weight.data, x.T @ x, x.shape[0], grid_for(w, "nf4"), refit=False)
    seen = []
    cal = SimpleNamespace(stats=lambda b, inputs: (seen.append(b.o_proj.bias is not None)
                                                   or Stats(means={"o_proj": x.mean(0), "down_proj": x.mean(0)}), None))
    correct_means(block, before, cal, x)
    with torch.no_grad():
        shift = (block.o_proj(x) - x @ w.T).mean(0).abs().max().item()
        uncorrected = (x @ (block.o_proj.weight - w).T).mean(0).abs().max().item()
    assert shift < 1e-4 < uncorrected / 100, (shift, uncorrected)
    assert block.down_proj.bias is None and seen == [False]    # unchanged: no bias, no pass


@pytest.mark.parametrize("quant", QUANTS)
def test_refit_of_the_grid_lowers_the_output_error_and_keeps_the_codes(quant):
    """w4a16 and nf4 refit a number per group of 32; w8a16's one bf16 scale per row is
    already at its best to bf16's resolution, so there the refit must only not hurt."""
    w, x = layer(seed=3)
    plain_grid, refit_grid = grid_for(w, quant), grid_for(w, quant)
    plain = gptq_(w.clone(), x.T @ x, x.shape[0], plain_grid, damp=0.01, refit=False)
    refit = gptq_(w.clone(), x.T @ x, x.shape[0], refit_grid, damp=0.01)
    e_plain, e_refit = output_error(plain, w, x), output_error(refit, w, x)
    print(f"{quant}: output MSE gptq {e_plain:.3e}, with the refit grid {e_refit:.3e}")
    assert torch.equal(refit_grid.codes(refit), plain_grid.codes(plain))
    if quant == "w8a16":
        assert e_refit <= e_plain * (1 + 1e-6)
    else:
        assert e_refit < 0.97 * e_plain
        assert not torch.equal(refit_grid.params(), plain_grid.params())
