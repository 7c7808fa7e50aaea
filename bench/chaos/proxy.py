"""TCP proxies: one that injects faults in front of a server, and a round-robin load balancer.

A `FaultProxy` forwards 127.0.0.1:port to an upstream and can, on demand:
- `drop_all()`: cut every open connection with a RST, as a crashed peer's host does;
- `refuse()` / `accept()`: close the listening socket for real (ECONNREFUSED), then listen again;
- `stall()` / `unstall()`: accept connections and forward nothing, either way, until unstalled;
- `latency`: seconds added before each chunk is forwarded;
- `send_fatal()`: tell every client what PostgreSQL tells the client of a terminated backend
  (FATAL 57P01), without closing yet: the moment between that message and the close that a
  busy client can see apart;
- `cut_after_commit(marker)`: cut the connection whose transaction bound `marker` once that
  transaction has committed, as the client next speaks (a failure after the commit).

    async with fault_proxy("postgres", admin_url) as proxy:
        url = url_through(admin_url, proxy.port)  # the same server, through the proxy

The upstream may be a Unix socket's directory (libpq's `?host=/dir`, as the embedded PostgreSQL
gives): the proxy still listens on TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bench.chaos.cluster import free_port

__all__ = ["FaultProxy", "LoadBalancer", "fault_proxy", "url_through"]

_CHUNK = 65536


def url_through(url: str, port: int, *, host: str = "127.0.0.1") -> str:
    """`url` with its host and port replaced by `host`:`port` (a `host` or `port` in its
    query too, which libpq would prefer to the proxy's)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k not in ("host", "port")]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def _upstream(url: str) -> tuple[str, int]:
    """The host (or Unix socket directory) and port that `url` names; PostgreSQL's port when
    it names none."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "127.0.0.1"
    return host, int(query.get("port") or parts.port or 5432)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Listener:
    """A listening socket on a fixed port (of ``host``) that can be closed and opened again."""

    def __init__(self, port: int, *, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._server: asyncio.Server | None = None
        self.connections = 0  # accepted since the start
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._conns.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # `drop_all` cancels it; asyncio would log a cancelled connection callback.
            pass
        finally:
            self._conns.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def accept(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                self._server = await asyncio.start_server(
                    self._on_connect, self.host, self.port, reuse_address=True
                )
                return
            except OSError:  # the port lingers a moment after a close
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def drop_all(self) -> int:
        """Cuts every open connection (RST); answers how many there were."""
        conns = list(self._conns)
        for writer in conns:
            _reset(writer)
        for task in list(self._tasks):
            task.cancel()
        return len(conns)

    async def refuse(self) -> None:
        """Stops listening (new connections are refused) and cuts the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_all()

    async def close(self) -> None:
        tasks = list(self._tasks)
        await self.refuse()
        if tasks:  # each aborts its connections as it ends
            await asyncio.wait(tasks, timeout=5)
        # An aborted transport closes its socket on the loop's next turn.
        await asyncio.sleep(0)
        await asyncio.sleep(0)


@dataclass
class _Watched:
    """One client connection of a `FaultProxy`, as `FaultProxy.cut_after_commit` follows it."""

    client: asyncio.StreamWriter
    sent_marker: bool = False
    committed: bool = False


async def _pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    proxy: FaultProxy | None,
    watched: _Watched | None = None,
    *,
    to_upstream: bool = False,
) -> None:
    try:
        while True:
            chunk = await source.read(_CHUNK)
            if not chunk:
                break
            if proxy is not None:
                await proxy.flowing.wait()
                if proxy.latency:
                    await asyncio.sleep(proxy.latency)
                if watched is not None and proxy.cuts(watched, chunk, to_upstream=to_upstream):
                    sink.transport.abort()
                    break
            sink.write(chunk)
            await sink.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
    proxy: FaultProxy | None,
) -> bool:
    """Forwards both ways until both sides close; answers False when upstream refused."""
    watched = _Watched(writer)
    try:
        if host.startswith("/"):  # a Unix socket's directory, named as libpq does
            up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    try:
        await asyncio.gather(
            _pump(reader, up_writer, proxy, watched, to_upstream=True),
            _pump(up_reader, writer, proxy, watched),
        )
    finally:
        up_writer.transport.abort()
    return True


def _error_response(fields: dict[str, str]) -> bytes:
    """A PostgreSQL ErrorResponse message (protocol 3.0)."""
    body = b"".join(code.encode() + value.encode() + b"\0" for code, value in fields.items())
    body += b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


# PostgreSQL's CommandComplete of a COMMIT (protocol 3.0): the transaction is committed.
_COMMITTED = b"C\x00\x00\x00\x0bCOMMIT\x00"

# What `pg_terminate_backend` makes a backend send before it closes its socket.
_TERMINATED = _error_response(
    {
        "S": "FATAL",
        "V": "FATAL",
        "C": "57P01",
        "M": "terminating connection due to administrator command",
    }
)


class FaultProxy(_Listener):
    """See the module docstring."""

    def __init__(
        self, name: str, upstream: tuple[str, int], port: int, *, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(port, host=host)
        self.name = name
        self.upstream = upstream
        self.latency = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._commit_cut: tuple[bytes, asyncio.Event] | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    def stall(self) -> None:
        self.flowing.clear()

    def unstall(self) -> None:
        self.flowing.set()

    def send_fatal(self) -> int:
        """Writes PostgreSQL's FATAL "terminating connection" to every client connection, as a
        terminated backend does, and leaves them open until `drop_all`: on a busy client the
        close can arrive after the client has used the connection again. Answers how many."""
        conns = list(self._conns)
        for writer in conns:
            writer.write(_TERMINATED)
        return len(conns)

    def cut_after_commit(self, marker: bytes) -> asyncio.Event:
        """Arms one cut: the connection whose client sends ``marker`` (a value bound in a
        statement, whole in one read) and whose server then answers a COMMIT is cut (RST) as
        soon as its client sends anything more: committed, and the client's next words (asyncpg's
        reset when the connection goes back to its pool) meet a dead connection. Answers an
        event set once the cut is made."""
        cut = asyncio.Event()
        self._commit_cut = (marker, cut)
        return cut

    def cuts(self, watched: _Watched, chunk: bytes, *, to_upstream: bool) -> bool:
        """Whether ``chunk``, about to be forwarded on ``watched``, is where `cut_after_commit`
        cuts (the client then has its RST)."""
        if self._commit_cut is None:
            return False
        marker, cut = self._commit_cut
        if not to_upstream:
            watched.committed = watched.committed or (watched.sent_marker and _COMMITTED in chunk)
            return False
        if watched.committed:
            self._commit_cut = None
            _reset(watched.client)
            cut.set()
            return True
        watched.sent_marker = watched.sent_marker or marker in chunk
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()  # a stalled proxy accepts and says nothing
        if not await _splice(reader, writer, *self.upstream, self):
            _reset(writer)


class LoadBalancer(_Listener):
    """Round robin over instances, skipping one whose port refuses: each a port on 127.0.0.1,
    or a (host, port)."""

    def __init__(
        self, port: int, instances: Sequence[int | tuple[str, int]], rng: random.Random
    ) -> None:
        super().__init__(port)
        self.instances = [("127.0.0.1", i) if isinstance(i, int) else i for i in instances]
        self._next = rng.randrange(len(self.instances))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = self._next
        self._next = (self._next + 1) % len(self.instances)
        for i in range(len(self.instances)):
            host, port = self.instances[(start + i) % len(self.instances)]
            if await _splice(reader, writer, host, port, None):
                return
        _reset(writer)


@contextlib.asynccontextmanager
async def fault_proxy(name: str, url: str, *, host: str = "127.0.0.1") -> AsyncIterator[FaultProxy]:
    """A proxy, listening on a free port of `host`, in front of the server of `url` (a
    postgresql://, redis:// or http:// URL); whatever it was doing, it lets go and closes at
    the end."""
    proxy = FaultProxy(name, _upstream(url), free_port(), host=host)
    await proxy.accept()
    try:
        yield proxy
    finally:
        proxy.unstall()
        await proxy.close()
