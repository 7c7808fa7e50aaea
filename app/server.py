"""Running the app under uvicorn, with a shutdown that tells open streams first."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from app.application import create_app
from app.settings import Settings
from app.web.http_limits import ConnectionLimits, limited_protocol

__all__ = ["run_server", "server_config"]

logger = logging.getLogger(__name__)

# uvicorn waits this long for open connections after a signal; streams close well before.
GRACEFUL_SHUTDOWN_SECONDS = 5


class _Server(uvicorn.Server):
    """uvicorn waits for open connections before it runs the lifespan shutdown, and an SSE
    stream never ends by itself: so the signal must reach the streams directly."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)  # type: ignore[arg-type]
        # Objects made during start-up live for the whole run: freezing them keeps the
        # collector from walking them again and again, which is most of the latency tail.
        gc.collect()
        gc.freeze()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn shuts down gracefully on SIGINT and SIGTERM; SIGHUP (the terminal was
        closed) must too. Once shut down, uvicorn raises the signal again for the caller's
        handler (`app.cli.main` turns it into an exception that stops the embedded servers)."""
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        begin = getattr(self._app.state, "begin_shutdown", None)
        if begin is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(begin)
        super().handle_exit(sig, frame)


def server_config(
    settings: Settings, app: ASGIApp, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn as Lookout serves it; the tests serve the app with the same configuration."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        # httptools, with the limits uvicorn lacks (app.web.http_limits).
        http=limited_protocol(ConnectionLimits.from_settings(settings)),
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=settings.keep_alive_seconds,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise, which lets
        # anyone on the machine (or a proxy that passes the header through) pick the address
        # the rate limits count: only the configured proxies are believed.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies),
        access_log=False,
        log_level=log_level,
    )


def run_server(
    settings: Settings,
    *,
    host: str,
    port: int,
    app: Starlette | None = None,
    log_level: str = "info",
) -> None:
    app = app if app is not None else create_app(settings)
    gc.set_threshold(50_000, 20, 20)
    _Server(server_config(settings, app, host=host, port=port, log_level=log_level), app).run()
