"""Tier 1: the one typed config (serving/config.py): sections and flat names, sizes, refusals
that name the field, and CLI flags made from its fields."""
import argparse

import pytest

from serving.config import FLAT, SECTIONS, Config, ControllerConfig, cli_flags, from_args, load
from shards.errors import ShardServeError

pytestmark = pytest.mark.unit


def test_sections_and_flat_names_are_the_same_fields():
    nested = load({"model": {"name": "x.gguf", "shards": 3}, "cache": {"kv_tokens": 4096}})
    flat = load({"model": "x.gguf", "shards": 3, "kv_tokens": 4096})
    assert nested == flat and nested.model.name == "x.gguf" and nested.cache.kv_tokens == 4096
    assert load(flat, controller={"readings": 1}, prefix="a-").controller.readings == 1
    assert flat.replace(control=False).controller.enabled is False and flat.controller.enabled is True
    # a flat name wins over its section in any key order (yaml.safe_dump sorts keys)
    c = load({"compile": False, "model": {"compile": True}, "replicas": 2, "server": {"replicas": 1}})
    assert c.model.compile is False and c.server.replicas == 2


def test_sizes_and_refusals_name_the_field():
    c = load(budgets=["300MiB", 1000], min_node_free_bytes="1GiB")
    assert c.cache.budgets == [300 * 2**20, 1000] and c.controller.min_node_free_bytes == 2**30
    for bad, field in (({"device": "tpu"}, "model.device"), ({"shardz": 2}, "shardz"),
                       ({"budgets": ["300 parsecs"]}, "cache.budgets"), ({"compression": "int9"}, "model.compression"),
                       ({"controller": {"low_watermark": 0.9, "high_watermark": 0.8}}, "watermarks")):
        with pytest.raises(ShardServeError, match=field):
            load(bad)


def test_every_field_has_a_flag_with_help_and_a_unique_flat_name():
    parser = argparse.ArgumentParser()
    cli_flags(parser)
    flags = {a.dest: a for a in parser._actions if a.dest in FLAT}
    assert set(flags) == set(FLAT) == {f for s in SECTIONS.values() for f in s.model_fields} - {"name", "enabled"} | {
        "model", "control"}
    assert all(a.help and a.default is argparse.SUPPRESS for a in flags.values())
    args = parser.parse_args(["--kv-tokens", "4096", "--no-compile", "--budgets", "1GiB,2GiB", "--actions", "move"])
    cfg = from_args(args)
    assert (cfg.cache.kv_tokens, cfg.model.compile, cfg.cache.budgets) == (4096, False, [2**30, 2 * 2**30])
    assert cfg.controller.actions == ("move",) and cfg.model.shards == Config().model.shards   # others keep defaults


def test_policy_reads_the_controller_section():
    from serving.control.policy import pressure  # noqa: F401  (imports the section, no copy of it)
    assert ControllerConfig().high_watermark == 0.95
