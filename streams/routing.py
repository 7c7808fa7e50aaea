"""Serving long-lived streams ahead of the app's middleware.

Every ``send`` of a response passes through each middleware's wrapper (Starlette's
ServerErrorMiddleware, ExceptionMiddleware and the route's own exception wrapper: three
coroutines per event per client) and each keeps its frames alive for the whole stream. For a
stream that is most of the cost: measured with 2,000 clients at 50,000 deliveries/s, 19 KB and
p99 118 ms per connection behind Starlette's stack against 15 KB and 43 ms ahead of it (see
bench/streams_fanout.py, ``routed-broadcast-2000`` against ``broadcast-2000``). A caller may
route a busy short request here too, for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["DirectRoutes", "StreamHandler"]

# Answers the ASGI callable to run: an EventStreamResponse, or any Response (errors, 204).
StreamHandler = Callable[[Request], Awaitable[ASGIApp]]

_PARAM: Final = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


def _method_and_pattern(route: str) -> tuple[str, re.Pattern[str]]:
    method, _, path = route.rpartition(" ")
    return method or "GET", _compile(path)


def _compile(path: str) -> re.Pattern[str]:
    pattern, last = "", 0
    for match in _PARAM.finditer(path):
        pattern += re.escape(path[last : match.start()]) + f"(?P<{match[1]}>[^/]+)"
        last = match.end()
    return re.compile(pattern + re.escape(path[last:]))


class DirectRoutes:
    """An ASGI app that serves the given paths itself and hands the rest to ``app``.

    ``routes``: ``("/v1/operations/{op_id}/events", handler)`` pairs, for ``GET``; a path may
    name another method first (``"POST /v1/hooks"``). A handler gets a
    ``Request`` whose ``app`` and ``path_params`` are set as Starlette would; since it runs
    outside the app's middleware, it must turn its own errors into responses.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[tuple[str, StreamHandler]],
        *,
        scope_app: object | None = None,
    ) -> None:
        self.app = app
        # What handlers see as ``request.app``: the Starlette app when ``app`` is only its
        # ``__call__`` (a Starlette subclass that routes streams first).
        self._scope_app = scope_app if scope_app is not None else app
        self._routes = [(*_method_and_pattern(path), handler) for path, handler in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for method, pattern, handler in self._routes:
                if scope["method"] != method:
                    continue
                match = pattern.fullmatch(scope["path"])
                if match is not None:
                    scope = {**scope, "app": self._scope_app, "path_params": match.groupdict()}
                    response = await handler(Request(scope, receive))
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> object:
        # ``state``, ``url_path_for`` and the like stay reachable through the wrapper.
        return getattr(self.app, name)
