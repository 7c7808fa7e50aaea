"""A lean pub/sub connection: raw socket plus hiredis, without redis-py's per-message costs.

redis-py's PubSub builds a dict, records metrics and (with RESP3, in 8.1.0) formats a debug
string for every message; the hub reads thousands of messages a second on one connection, so
it speaks RESP2 itself and parses whole reads at once.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

__all__ = ["PubSubConnection", "PubSubError", "RedisEndpoint", "encode_command"]

_READ_SIZE = 65536


class PubSubError(ConnectionError):
    """Redis refused a pub/sub command or sent something the hub cannot read."""


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """Where and how to open the hub's own connection."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = None
    tls: bool = False
    connect_timeout: float = 5.0

    @classmethod
    def from_client(cls, redis: Redis) -> RedisEndpoint:
        """The endpoint of an existing redis.asyncio client (host or unix socket, auth, TLS)."""
        pool = redis.connection_pool
        kwargs = pool.connection_kwargs
        timeout = kwargs.get("socket_connect_timeout") or 5.0
        return cls(
            host=str(kwargs.get("host", "127.0.0.1")),
            port=int(kwargs.get("port", 6379)),
            path=kwargs.get("path")
            if issubclass(pool.connection_class, UnixDomainSocketConnection)
            else None,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=issubclass(pool.connection_class, SSLConnection),
            connect_timeout=float(timeout),
        )

    @classmethod
    def of_node(cls, node: ClusterNode) -> RedisEndpoint:
        """The endpoint of one node of a redis.asyncio cluster client, with the client's auth
        and TLS."""
        kwargs = node.connection_kwargs
        timeout = kwargs.get("socket_connect_timeout") or 5.0
        return cls(
            host=str(node.host),
            port=int(node.port),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=issubclass(node.connection_class, SSLConnection),
            connect_timeout=float(timeout),
        )

    @property
    def address(self) -> str:
        """For log lines: where this endpoint is."""
        return self.path or f"{self.host}:{self.port}"


def encode_command(*parts: str | bytes) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class PubSubConnection:
    """One RESP2 connection: ``send`` raw commands, ``receive`` every reply read so far."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._reader = hiredis.Reader()

    @classmethod
    async def connect(cls, endpoint: RedisEndpoint, *, name: str | None = None) -> PubSubConnection:
        with anyio.fail_after(endpoint.connect_timeout):
            stream: anyio.abc.ByteStream
            if endpoint.path is not None:
                stream = await anyio.connect_unix(endpoint.path)
            elif endpoint.tls:
                context = ssl.create_default_context()
                stream = await anyio.connect_tcp(endpoint.host, endpoint.port, ssl_context=context)
            else:
                stream = await anyio.connect_tcp(endpoint.host, endpoint.port)
            conn = cls(stream)
            try:
                if endpoint.password is not None:
                    auth = ["AUTH", endpoint.password]
                    if endpoint.username:
                        auth.insert(1, endpoint.username)
                    await conn._expect_ok(auth, "check the password in the Redis URL")
                if name:
                    # Named so that operators (and tests) can find the hub in CLIENT LIST.
                    await conn._expect_ok(["CLIENT", "SETNAME", name], "the name has a space?")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()
                raise
        return conn

    async def _expect_ok(self, command: list[str], hint: str) -> None:
        await self.send(encode_command(*command))
        reply = await self.receive()
        if reply != [b"OK"]:
            raise PubSubError(f"Redis answered {command[0]} with {reply!r}; {hint}")

    async def send(self, data: bytes) -> None:
        await self._stream.send(data)

    async def receive(self) -> list[Any]:
        """At least one reply; raises anyio.EndOfStream when Redis closes the connection. An
        error reply is a ``hiredis.ReplyError`` among them: in a cluster, a ``MOVED`` answers
        one command only, and the connection goes on."""
        reader = self._reader
        replies: list[Any] = []
        while not replies:
            reader.feed(await self._stream.receive(_READ_SIZE))
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        return replies

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> PubSubConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()
