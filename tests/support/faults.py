"""Real network faults between Lookout and a server: a TCP proxy the test can close, reopen,
or make hold connections, on a fixed loopback port.

    async with tcp_proxy(admin_dsn) as proxy:
        backend = GraphBackend(proxy.dsn)   # the same server, through the proxy
        await proxy.refuse()                # connections are refused (RST), open ones cut
        await proxy.accept()                # forwarding again, on the same port
        proxy.hold()                        # connections are accepted and go nowhere...
        proxy.release()                     # ...until released: then they are forwarded

Refusing closes the listening socket for real, so a client sees ECONNREFUSED exactly as when
the server is down.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup, UNIXSocketStream

from tests.support.live import free_port

__all__ = ["TcpProxy", "tcp_proxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream``; see the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int) -> None:
        # A host that is a directory is a Unix socket's (libpq's convention), as the embedded
        # PostgreSQL may give.
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.connections = 0  # accepted since the start
        self._tg: TaskGroup | None = None
        self._listener: SocketListener | None = None
        self._serving: anyio.CancelScope | None = None
        self._open: dict[SocketStream, anyio.CancelScope] = {}
        self._released = anyio.Event()
        self._released.set()

    def url_for(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")])
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    async def accept(self) -> None:
        """Listens (again) on the proxy's port and forwards every new connection."""
        assert self._tg is not None, "use the proxy inside `async with tcp_proxy(...)`"
        if self._listener is not None:
            return
        with anyio.fail_after(10):
            while True:
                try:
                    multi = await anyio.create_tcp_listener(
                        local_host="127.0.0.1", local_port=self.port
                    )
                    self._listener = cast(SocketListener, multi.listeners[0])
                    break
                except OSError:  # the port lingers for a moment after a close
                    await anyio.sleep(0.05)
        self._serving = anyio.CancelScope()
        self._tg.start_soon(self._serve, self._listener, self._serving)

    async def refuse(self) -> None:
        """Closes the listening socket and cuts (RST) every open connection."""
        if self._serving is not None:
            self._serving.cancel()
            self._serving = None
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        for stream, scope in list(self._open.items()):
            _reset(stream)
            scope.cancel()

    def hold(self) -> None:
        """New connections are accepted but not forwarded until ``release``."""
        if self._released.is_set():
            self._released = anyio.Event()

    def release(self) -> None:
        self._released.set()

    async def _serve(self, listener: SocketListener, scope: anyio.CancelScope) -> None:
        with scope, contextlib.suppress(anyio.ClosedResourceError):
            while True:
                client = await listener.accept()
                self.connections += 1
                assert self._tg is not None
                self._tg.start_soon(self._forward, client)

    async def _forward(self, client: SocketStream) -> None:
        scope = self._open[client] = anyio.CancelScope()
        try:
            with scope:
                await self._released.wait()
                host, port = self.upstream
                try:
                    upstream: SocketStream | UNIXSocketStream = (
                        await anyio.connect_unix(f"{host}/.s.PGSQL.{port}")
                        if host.startswith("/")
                        else await anyio.connect_tcp(host, port)
                    )
                except OSError:
                    _reset(client)
                    return
                async with upstream, anyio.create_task_group() as tg:
                    tg.start_soon(_pump, client, upstream, tg.cancel_scope)
                    tg.start_soon(_pump, upstream, client, tg.cancel_scope)
        finally:
            self._open.pop(client, None)
            with anyio.CancelScope(shield=True):
                await client.aclose()


async def _pump(
    source: SocketStream | UNIXSocketStream,
    sink: SocketStream | UNIXSocketStream,
    both: anyio.CancelScope,
) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    both.cancel()


def _reset(stream: SocketStream) -> None:
    """Makes the next close send RST instead of FIN, as a crashed server's host does."""
    with contextlib.suppress(OSError):
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@contextlib.asynccontextmanager
async def tcp_proxy(dsn: str, *, port: int | None = None) -> AsyncIterator[TcpProxy]:
    """A proxy, accepting, in front of the server of ``dsn`` (a postgresql:// or redis:// URL,
    the host a name, an address, or a Unix socket's directory in ``?host=``)."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "127.0.0.1"
    upstream_port = int(query.get("port") or parts.port or 5432)
    proxy = TcpProxy(host, upstream_port, port or free_port())
    async with anyio.create_task_group() as tg:
        proxy._tg = tg
        await proxy.accept()
        try:
            yield proxy
        finally:
            proxy.release()
            await proxy.refuse()
            tg.cancel_scope.cancel()
