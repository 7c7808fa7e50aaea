"""streams/ and provisioning/ have no module cycles, and neither imports from a layer above it.

Imports are read with ``ast``, TYPE_CHECKING ones included: a type-only import is still a
dependency of the reader's understanding, and the cycle it makes is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, absolute, as written (``from x import y`` gives x and,
    when x.y is a module, x.y too: the caller decides which exist)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                module = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # The package's face imports its modules, and they are its parts: not a cycle.
        graph[name] = {m for m in _imports(name, path) if m in modules and m != package}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


@pytest.mark.parametrize("package", ["streams", "provisioning"])
def test_no_module_cycle(package: str) -> None:
    assert _cycle(_graph(package)) is None


@pytest.mark.parametrize(
    ("package", "forbidden"), [("streams", ("provisioning", "app")), ("provisioning", ("app",))]
)
def test_no_import_from_a_layer_above(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = {
        f"{name} imports {module}"
        for name, path in _modules(package).items()
        for module in _imports(name, path)
        if module.split(".")[0] in forbidden
    }
    assert not wrong


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
