"""The rooms of the code hold: imports run down the layers only, and nothing imports in a circle.

Read from the source with `ast` (every import, those under `if TYPE_CHECKING:` and inside
functions too), so that it holds for code that never runs in a test."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "streams", "provisioning")

# Arrows run down only: cli/demo -> application -> web -> billing -> provisioning -> streams.
# The foundation (settings, db, users, audit, ids) is below everything in app/.
FOUNDATION = {"app.settings", "app.db", "app.users", "app.audit", "app.ids"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that `name` (a module, or a name inside one) denotes."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(module: str, path: Path) -> Iterator[str]:
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _imports(module: str) -> set[str]:
    """What `module` imports: modules of ours, and the first part of every other name."""
    found: set[str] = set()
    for name in _imported_names(module, MODULES[module]):
        ours = _resolve(name)
        if ours is not None:
            found.add(ours)
        else:
            found.add(name.partition(".")[0])
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _offences(sources: str, forbidden: Iterable[str]) -> list[str]:
    forbidden = tuple(forbidden)
    return sorted(
        f"{module} imports {imported}"
        for module, imports in GRAPH.items()
        if _within(module, sources)
        for imported in imports
        if any(_within(imported, f) for f in forbidden)
    )


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in graph:
                continue
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _room_of(module: str) -> str:
    """The package a module belongs to (a package's `__init__` belongs to the package itself);
    the modules at the top of `app/` (the foundation, the composition root) are rooms of their
    own, so that `app.application` -> `app.web` -> `app.settings` is no circle."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return module if package == "app" else package


def _room_graph(prefix: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, imports in GRAPH.items():
        if _within(module, prefix):
            source = _room_of(module)
            face = MODULES[module].name == "__init__.py"
            graph.setdefault(source, set()).update(
                _room_of(imported)
                for imported in imports
                # A package's `__init__` may import its own modules (its face).
                if _within(imported, prefix) and not (face and _within(imported, module))
            )
            graph[source].discard(source)
    return graph


def test_the_graph_was_read() -> None:
    assert "app.application" in MODULES and "app.web.routes.billing" in GRAPH
    assert "app.billing.subscriptions" in GRAPH["app.web.owned"]


def test_streams_imports_neither_app_nor_provisioning() -> None:
    assert _offences("streams", ["app", "provisioning"]) == []


def test_provisioning_imports_nothing_from_app() -> None:
    assert _offences("provisioning", ["app"]) == []


def test_billing_knows_no_http_and_nothing_above_it() -> None:
    above = ["app.web", "app.cli", "app.demo", "app.application", "app.server"]
    assert _offences("app.billing", [*above, "starlette", "uvicorn"]) == []


def test_web_imports_neither_the_command_nor_the_demo() -> None:
    assert _offences("app.web", ["app.cli", "app.demo", "app.application", "app.server"]) == []


def test_the_foundation_stands_on_nothing_of_app() -> None:
    for module in FOUNDATION:
        assert {m for m in GRAPH[module] if _within(m, "app")} <= FOUNDATION, module


def test_no_module_imports_in_a_circle_within_app() -> None:
    app_only = {m: {i for i in imports if _within(i, "app")} for m, imports in GRAPH.items()}
    assert [c for c in _components(app_only) if _within(c[0], "app")] == []


def test_no_package_imports_in_a_circle_within_app() -> None:
    assert _components(_room_graph("app")) == []


def test_no_circle_between_the_top_level_packages() -> None:
    tops = {
        package: {
            i.partition(".")[0]
            for m, imports in GRAPH.items()
            if _within(m, package)
            for i in imports
            if i.partition(".")[0] in PACKAGES and not _within(i, package)
        }
        for package in PACKAGES
    }
    assert _components(tops) == []


@pytest.mark.parametrize("package", ["streams", "provisioning"])
def test_no_module_imports_in_a_circle_within(package: str) -> None:
    inside = {m: {i for i in imports if _within(i, package)} for m, imports in GRAPH.items()}
    assert [c for c in _components(inside) if _within(c[0], package)] == []


def test_no_test_imports_from_a_conftest() -> None:
    """Fixtures reach tests through pytest; shared helpers live in support modules."""
    offences = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offences += [f"{path.relative_to(ROOT)}: {n}" for n in names if "conftest" in n]
    assert offences == []


def test_the_faces_of_app_import_nothing() -> None:
    """Python runs a package's `__init__` before any module in it: an import there is an import
    of every module below, which the arrows above would not see."""
    faces = [m for m, path in MODULES.items() if _within(m, "app") and path.name == "__init__.py"]
    outside = {
        face: {
            i for i in GRAPH[face] if _within(i, "app") and (face == "app" or not _within(i, face))
        }
        for face in faces
    }
    assert {face: found for face, found in outside.items() if found} == {}


def test_the_wheel_lists_every_package() -> None:
    """pyproject.toml lists the wheel's packages (the dashboard is mapped in as app.static): a
    package left out installs nowhere but in a checkout."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert found - listed == set()
