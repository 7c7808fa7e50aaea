"""A TCP forwarder in front of the app that can cut every connection, as a failing network or
a dying load balancer does, and that keeps what the browser sent, to read its requests.

Ending an HTTP response politely is not the same as a dropped connection: here the browser's
sockets really close in the middle of a response, and the app sees its clients vanish."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["DroppingProxy", "SeenRequest", "dropping_proxy"]

_REQUEST = re.compile(
    rb"^(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) (\S+) HTTP/1\.1\r\n(.*?)\r\n\r\n",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class SeenRequest:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # names in lower case

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass
class DroppingProxy:
    upstream_host: str
    upstream_port: int
    url: str = ""
    refusing: bool = False
    _open: set[anyio.CancelScope] = field(default_factory=set)
    # What each connection's client sent, whole: requests are small.
    _sent: list[bytearray] = field(default_factory=list)

    def drop(self, *, refuse: bool = False) -> int:
        """Cuts every open connection; with ``refuse``, new ones are closed at once until
        ``reopen()``. Answers how many connections were cut."""
        self.refusing = refuse
        scopes = list(self._open)
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    def reopen(self) -> None:
        self.refusing = False

    def requests(self, path: str | None = None) -> list[SeenRequest]:
        """The HTTP requests the browser sent so far (all, or those for ``path``), in the
        order of their connections."""
        found = []
        for data in self._sent:
            for match in _REQUEST.finditer(bytes(data)):
                method, target, head = (part.decode("latin-1") for part in match.groups())
                headers = {}
                for line in head.split("\r\n"):
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                request = SeenRequest(method, target, headers)
                if path is None or request.path == path:
                    found.append(request)
        return found

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            if self.refusing:
                return
            try:
                upstream = await anyio.connect_tcp(self.upstream_host, self.upstream_port)
            except OSError:
                return
            sent = bytearray()
            self._sent.append(sent)
            async with upstream, anyio.create_task_group() as tg:
                self._open.add(tg.cancel_scope)
                try:
                    tg.start_soon(_pump, client, upstream, sent, tg.cancel_scope)
                    await _pump(upstream, client, None, tg.cancel_scope)
                finally:
                    self._open.discard(tg.cancel_scope)


async def _pump(
    source: anyio.abc.SocketStream,
    sink: anyio.abc.SocketStream,
    log: bytearray | None,
    scope: anyio.CancelScope,
) -> None:
    # HTTP/1.1 needs no half-closed connections: either side ending ends both.
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        async for chunk in source:
            if log is not None:
                log.extend(chunk)
            await sink.send(chunk)
    scope.cancel()


@contextlib.asynccontextmanager
async def dropping_proxy(upstream_url: str) -> AsyncIterator[DroppingProxy]:
    """A proxy on a free loopback port forwarding to ``upstream_url`` (http://host:port)."""
    host, _, port = upstream_url.removeprefix("http://").rstrip("/").rpartition(":")
    proxy = DroppingProxy(host, int(port))
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy.url = f"http://127.0.0.1:{listener.extra(SocketAttribute.local_port)}"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy.handle, tg)
        try:
            yield proxy
        finally:
            proxy.drop(refuse=True)
            tg.cancel_scope.cancel()
