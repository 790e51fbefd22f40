"""Tier 1: what a step carries between processes (shards/model/step.py)."""
import pickle

import numpy as np
import pytest
import torch

from shards.model.step import from_wire, to_wire

pytestmark = pytest.mark.unit


def test_tensors_cross_as_numpy_and_come_back_equal():
    for t in (torch.randn(2, 3, 576), torch.randn(1, 1, 8).half(), torch.tensor([[42, 7]])):
        w = to_wire(t)
        assert isinstance(w, np.ndarray)
        back = from_wire(pickle.loads(pickle.dumps(w, protocol=5)))
        assert back.dtype == t.dtype and torch.equal(back, t)


def test_read_only_arrays_are_copied_and_bf16_stays_a_tensor():
    a = np.arange(6, dtype=np.float32)
    a.setflags(write=False)            # as Ray hands out arrays from its object buffers
    t = from_wire(a)
    t += 1                             # writable, and not a view of the read-only buffer
    assert a[0] == 0 and t[0] == 1
    b = torch.randn(2, 4, dtype=torch.bfloat16)
    assert to_wire(b) is b and from_wire(b) is b
    assert from_wire(None) is None and to_wire(None) is None
