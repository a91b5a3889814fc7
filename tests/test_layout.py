"""The package's layout (issue 23): subpackages by pipeline stage, imports flowing one way.

Every ``import`` of every module (module level and inside functions) is read from the source,
so a lazy import that goes the wrong way is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simsearch_wsi"

#: lowest first: a package may import from its own layer's package and those before it
LAYERS = (
    "core",
    "io",
    "qupath",
    "synthetic",
    "features",
    "search",
    "train",
    "infer",
    "review",
    "cohort",
    "eval",
    "demo",
    "server",
    "cli",
)


def _package_of(module: str) -> str | None:
    """``simsearch_wsi.search.engine`` -> ``search``; the top-level package itself -> None."""
    parts = module.split(".")
    if parts[0] != "simsearch_wsi" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> set[str]:
    """Absolute names of the simsearch_wsi modules ``path`` imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use absolute imports"
            if node.module and node.module.startswith("simsearch_wsi"):
                out.add(node.module)
                if node.module == "simsearch_wsi":
                    out.update(f"simsearch_wsi.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("simsearch_wsi"))
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the modules that make that edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        src = _package_of(".".join(rel.parts))
        if src is None or src == "__init__":
            continue
        for name in _imports(path):
            dst = _package_of(name)
            if dst is None or dst in ("__init__", "__version__") or dst == src:
                continue
            edges.setdefault((src, dst), []).append(str(rel))
    return edges


def test_every_subpackage_has_a_layer() -> None:
    found = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py")
    } - {"__init__"}
    assert found == set(LAYERS), "add the new package to LAYERS (and README's Architecture)"


def test_imports_flow_one_way() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = {
        f"{src} -> {dst} ({', '.join(sorted(set(mods)))})"
        for (src, dst), mods in _edges().items()
        if rank[dst] > rank[src]
    }
    assert not wrong, "imports that go against the layers:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_a_wrong_way_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from simsearch_wsi.cli.main import main\n")
    assert "simsearch_wsi.cli.main" in _imports(module)
    module.write_text("from .x import y\n")
    with pytest.raises(AssertionError, match="relative import"):
        _imports(module)


def test_no_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [])
