"""Tier 1: the compression registry (shards/compress/registry.py) is the only place that knows
method names: aliases resolve, every factory exists, and no module compares method names."""
import ast
from pathlib import Path

import pytest

from shards.compress import registry
from shards.compress.spec import CompressionError, parse

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old,new", [("int8-cpu", "w8a16"), ("int4-cpu", "w4a16"), ("w8a8-cpu", "w8a8"),
                                     ("w4a8-cpu", "w4a8x2"), ("int8", "llm-int8")])
def test_old_names_are_aliases_of_the_new(old, new):
    assert parse(old).quant == new and parse(old) == parse(new)
    if not registry.method(new).act_maxima:    # w8a8 takes nothing beside it
        assert parse(f"{old}+cut-mlp:0.2").spec == f"{new}+cut-mlp:0.2"


def test_presets_and_unknown_names():
    assert parse("fast").quant == "w4a8x2" and parse("balanced").quant == "w4a16"
    with pytest.raises(CompressionError, match="valid: fp32, bf16, w8a16"):
        registry.method("int3")


def test_every_factory_resolves():
    for m in registry.METHODS:
        assert callable(m.make_layer()) and callable(m.make_table()), m.name


def test_ladder_holds_the_served_spec_once():
    base = registry.ladder()
    assert "fp32" in base and "nf4" in base
    assert registry.ladder("w4a8-cpu") == base + ("w4a8x2",)
    assert registry.ladder("w8a16") == base


def _method_literals() -> set[str]:
    return {m.name for m in registry.METHODS} | {a for m in registry.METHODS for a in m.aliases}


def test_no_method_name_comparisons_outside_the_registry():
    """`x == "w8a16"`, `x in ("nf4", ...)` and dict keys of method names outside the registry
    would be a second source of truth."""
    names, hits = _method_literals(), []
    for path in list((ROOT / "shards").rglob("*.py")) + list((ROOT / "serving").rglob("*.py")):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            consts = []
            if isinstance(node, ast.Compare):
                for c in [node.left, *node.comparators]:
                    consts += [c] + (list(c.elts) if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [])
            elif isinstance(node, ast.Dict):
                consts = [k for k in node.keys if k is not None]
            hits += [f"{path.relative_to(ROOT)}:{c.lineno} {c.value!r}" for c in consts
                     if isinstance(c, ast.Constant) and c.value in names]
    assert not hits, "method names compared outside the registry: " + ", ".join(hits)


def test_the_scan_sees_a_comparison():
    tree = ast.parse('if quant == "w8a16": pass')
    cmp = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert cmp.comparators[0].value in _method_literals()
