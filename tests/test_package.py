"""The package's shape: no import cycles (lazy imports included), no oversized module, a sorted public API."""

from __future__ import annotations

import ast
from pathlib import Path

import aletheia_lora

SRC = Path(aletheia_lora.__file__).resolve().parent
# A module past this many lines holds more than one concern; split it (issue 13 set ~600).
MAX_LINES = 650


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every package module this file imports, at any depth (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` runs a, a.b and a.b.c: take the deepest known
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    # a submodule runs its parents' __init__ first; those edges are Python's, not ours
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target) :] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    graph = _graph()
    assert "aletheia_lora.select" in graph and graph["aletheia_lora.cli"], "the import graph was not read"
    assert _cycles(graph) == []


def test_no_module_is_oversized():
    paths = [*_modules().values(), *sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))]
    sizes = {
        path.name if path.parent.name == "bench" else _module_name(path): len(path.read_text().splitlines())
        for path in paths
    }
    assert len(sizes) > 20, "the package and the bench scripts were not read"
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_public_api_is_sorted_and_importable():
    names = aletheia_lora.__all__
    assert list(names) == sorted(names)
    for name in ("apply_aletheia_lora", "gradient_probe", "select_layers"):  # the reference's quick start
        assert name in names
    assert all(getattr(aletheia_lora, name, None) is not None for name in names)
