"""Tier 1: private APIs go through shards/compat.py, whose errors name the version needed."""
import pytest

from shards import compat

pytestmark = pytest.mark.unit


def test_missing_private_name_says_who_needs_it():
    with pytest.raises(compat.CompatError, match=r"torch .* has no torch\._no_such_op, which the test needs"):
        compat.private("torch", "torch._no_such_op", "the test")


def test_old_version_is_refused_with_the_version_needed(monkeypatch):
    compat.require.cache_clear()
    monkeypatch.setitem(compat.NEEDS, "torch", (99, 0))
    try:
        with pytest.raises(compat.CompatError, match=r"shardserve needs torch >= 99\.0"):
            compat.require("torch")
    finally:
        compat.require.cache_clear()


def test_every_accessor_resolves_on_the_tested_versions():
    for name in ("int8pack_mm", "int_mm", "int4pack_convert", "int4pack_mm", "dynamo_config", "inductor_config",
                 "dynamo_counters", "set_stance", "gguf_tensor_processors", "gguf_read_field",
                 "llama_rotary_embedding"):
        assert getattr(compat, name)() is not None, name
