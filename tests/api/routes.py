"""The routes the app mounts, and those of the contract that are still being built."""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.routing import Mount, Route

__all__ = ["NOT_YET_MOUNTED", "documented_operations", "mounted_operations", "shape"]

# Routes of the contract (and of the document) that other branches are adding. Once one is
# mounted, the test that lists mounted routes fails until it is removed from here; after the
# merge this set is empty.
NOT_YET_MOUNTED: frozenset[tuple[str, str]] = frozenset()
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def shape(path: str) -> str:
    """The path with its parameters' names erased: /v1/graphs/{graph_id} -> /v1/graphs/{}."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def mounted_operations(app: Starlette) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            methods = (route.methods or {"GET"}) - {"HEAD"}
            found |= {(method, shape(route.path)) for method in methods}
        elif isinstance(route, Mount):
            found.add(("GET", shape(route.path + "/{path}")))
        else:
            raise AssertionError(f"a route of a kind this test does not know: {route!r}")
    return found


def documented_operations(document: dict[str, object]) -> set[tuple[str, str]]:
    paths = document["paths"]
    assert isinstance(paths, dict)
    return {
        (method.upper(), shape(path))
        for path, item in paths.items()
        for method in item
        if method in _HTTP_METHODS
    }
