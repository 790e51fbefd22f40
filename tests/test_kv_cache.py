import pytest
import torch

from shards import KVCacheFull
from shards.model.kv_cache import BlockTable, PagedKV

pytestmark = pytest.mark.unit


def test_reserve_slots_free():
    t = BlockTable(n_blocks=4, block_size=4)
    t.reserve(7, 5)
    assert t.blocks[7] == [0, 1] and t.used_blocks == 2
    assert t.slots(7, 3, 2) == [3, 4]
    t.reserve(9, 4)
    t.reserve(7, 9)  # grows by one block
    assert t.blocks[7] == [0, 1, 3] and t.slots(7, 8, 1) == [12]
    with pytest.raises(KVCacheFull, match="needs 2 more blocks of 4 tokens for 5 tokens, 0 of 4 free"):
        t.reserve(11, 5)
    assert 11 not in t.blocks
    t.free(7)
    t.free(9)
    assert t.used_blocks == 0 and not t.lengths


def test_export_import_roundtrip():
    kv = PagedKV([2, 3], n_blocks=8, block_size=4, n_kv=2, head_dim=8)
    kv.table.reserve(1, 6)
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    kv.write(3, torch.tensor(kv.table.slots(1, 0, 6)), k, v)
    k2, v2 = kv.export(1, 3)
    other = PagedKV([3], n_blocks=8, block_size=4, n_kv=2, head_dim=8)
    other.table.reserve(1, 6)
    other.import_(1, 3, k2, v2)
    assert torch.equal(other.export(1, 3)[0], k) and torch.equal(other.export(1, 3)[1], v)
    assert kv.bytes_used() == 2 * kv.bytes_reserved() // 9
