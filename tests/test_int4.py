"""int4-cpu: the kernel computes exactly with its grid; a Q4_1 source's own codes are kept."""
import pytest
import torch

from shards.int4 import Int4CpuLinear, codes_on, rtn_grid


def test_kernel_computes_with_the_dequantized_grid():
    torch.manual_seed(0)
    w = torch.randn(96, 64) / 8
    lin = Int4CpuLinear(w, torch.randn(96))
    d, m = rtn_grid(w)
    q = codes_on(w, d, m).float().view(96, 2, 32)
    deq = (q * d.unsqueeze(-1) + m.unsqueeze(-1)).view(96, 64)
    assert torch.allclose(lin.dequantized(), deq, atol=1e-5)
    assert (deq - w).abs().max() <= (d.max() / 2) + 1e-6                # round to nearest
    x = torch.randn(5, 3, 64)
    assert torch.allclose(lin(x), x @ deq.t() + lin.bias, atol=1e-4)


def test_constant_group_and_bad_width():
    w = torch.ones(4, 32)
    assert torch.equal(Int4CpuLinear(w).dequantized(), w)
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4CpuLinear(torch.ones(4, 40))


@pytest.mark.parametrize("name", ["model.layers.7.self_attn.q_proj.weight",   # rows un-permuted
                                  "model.layers.7.self_attn.k_proj.weight",
                                  "model.layers.7.mlp.down_proj.weight"])
def test_q4_1_source_codes_kept_exactly(source, name):
    """The default GGUF stores Q4_1: on the file's own grid the packed weights equal the
    dequantized fp32 weights to the bit."""
    grid = source.int4_grid(name)
    w = source.tensor(name)
    assert grid is not None and grid[0].shape == (w.shape[0], w.shape[1] // 32)
    assert torch.equal(Int4CpuLinear(w, None, grid).dequantized(), w)
    assert source.int4_grid("model.embed_tokens.weight") is None   # Q8_0: not 4-bit groups
