"""Tier 1: the torch ops' C++ kernels (shards/runtime/ops.py, ops.cpp) give the Python kernels'
bits, read strided inputs, and raise with the numbers."""
import pytest
import torch

from shards.compress import qmatmul as qm
from shards.model import attention
from shards.runtime import ops

pytestmark = pytest.mark.unit


def test_the_ops_run_in_cpp_with_the_python_kernels_bits():
    qm._kernel()
    assert ops.native()          # a compiler and torch's headers: the glue builds and registers
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (48, 128), generator=g)
    d = torch.rand(48, 4, generator=g) * 0.01 + 0.001
    packed, scales = qm.pack(u, d, -8 * d, 4)
    x = torch.randn(128, 5, generator=g).t()            # strided: the C++ kernel makes it dense
    for levels in (1, 2):
        assert torch.equal(torch.ops.shardserve.qmatmul(x, packed, scales, 48, 4, levels),
                           qm.qmatmul(x, packed, scales, 48, 4, levels))
    with pytest.raises(RuntimeError, match="48 x 40 is not a multiple"):
        torch.ops.shardserve.qmatmul(torch.ones(1, 40), packed, scales, 48, 4, 2)


@pytest.mark.skipif(not attention.available(), reason="no attention kernel")
def test_decode_attention_runs_in_cpp_with_the_python_kernels_bits():
    g = torch.Generator().manual_seed(1)
    kp, vp = torch.randn(2, 6, 16, 64, generator=g), torch.randn(2, 6, 16, 64, generator=g)
    q = torch.randn(2, 64, 4, generator=g).transpose(1, 2)   # [B, heads, hd], strided
    ids, lens = torch.tensor([[0, 3, 5], [1, 2, 4]]), torch.tensor([40, 17])
    assert torch.equal(torch.ops.shardserve.paged_decode_attention(q, kp, vp, ids, lens, 0.125),
                       attention.paged_decode_attention(q, kp, vp, ids, lens, 0.125))
    with pytest.raises(RuntimeError, match="outside 3 blocks of 16 a sequence, 6 in the pool"):
        torch.ops.shardserve.paged_decode_attention(q, kp, vp, ids, torch.tensor([40, 49]), 0.125)


def test_an_op_without_a_kernel_in_the_glue_is_refused_by_name():
    qm._kernel()
    with pytest.raises(ValueError, match="'qmatmul2'"):
        ops.register(torch.library.Library("shardserve", "FRAGMENT"), "qmatmul2", qm._kernel().qmatmul, qm.qmatmul)
