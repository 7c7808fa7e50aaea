"""A real uvicorn server on a loopback port inside the test's event loop.

httpx's ASGI transport buffers a response until it ends, which hides everything that matters
about a live stream; a socket does not."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import uvicorn
from starlette.types import ASGIApp

from app.server import server_config
from app.settings import Settings

__all__ = ["database_dsn", "free_port", "live_server"]


def database_dsn(server_dsn: str, database: str) -> str:
    """The DSN of another database on the same server."""
    parts = urlsplit(server_dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def live_server(
    app: ASGIApp, *, port: int | None = None, settings: Settings | None = None
) -> AsyncIterator[str]:
    """Serves `app` (lifespan included) and answers its base URL, e.g. http://127.0.0.1:5123.
    With `settings`, as `lookout serve` serves it (app.server: its protocol and limits)."""
    port = port or free_port()
    if settings is not None:
        config = server_config(settings, app, host="127.0.0.1", port=port, log_level="warning")
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    config.lifespan = "on"
    # A stream that never ends must not hold the test up at shutdown.
    config.timeout_graceful_shutdown = 2
    server = uvicorn.Server(config)

    async def serve() -> None:
        # uvicorn closes its listening sockets only on a clean exit: cancelled (a test that
        # failed or timed out), it would leave them registered in the loop, and their
        # ResourceWarning would fail whichever test closes that loop.
        try:
            await server.serve()
        finally:
            for listener in getattr(server, "servers", ()):  # set once it has bound
                listener.close()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(serve)
        # Start-up runs the migrations and fills the pools: seconds when the machine is busy.
        with anyio.fail_after(60):
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("the live server did not start; see the log above")
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            begin = getattr(getattr(app, "state", None), "begin_shutdown", None)
            if begin is not None:
                begin()
            server.should_exit = True
