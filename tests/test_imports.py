"""Tier 1: the packages' import graph, function-local imports included, has no cycle, and the
pure layers (planning, the controller's policy, the compression grammar) import no torch or Ray."""
import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "serving")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Project modules `name` imports anywhere in its body: `import a.b`, `from a import b`
    (b a module or a name in a's __init__), at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            if node.module in modules:
                found.add(node.module)
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
    colour, parent = {}, {}
    for root in sorted(graph):
        if root in colour:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
            elif colour.get(nxt) == 1:
                path = [node]
                while path[-1] != nxt:
                    path.append(parent[path[-1]])
                return path[::-1] + [nxt]
            elif nxt not in colour:
                colour[nxt], parent[nxt] = 1, node
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40 and graph["shards.model.stage"]       # the walk saw the packages
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["shards.plan.planner", "shards.plan.placement", "shards.compress.spec",
                                    "shards.compress.registry", "serving.control.policy"])
def test_pure_layers_import_neither_torch_nor_ray(module):
    """Run in a fresh interpreter: what importing the module pulls in."""
    import subprocess
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'ray', 'bitsandbytes') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
