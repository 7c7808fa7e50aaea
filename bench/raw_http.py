"""A lean HTTP/1.1 client for load: keep-alive sockets and prebuilt requests.

The load client shares the machine's two cores with the server, PostgreSQL and Redis. httpx
spends about a core of its own on a burst of webhooks; this one sends the same bytes for a
fraction of that, so the figures measure Lookout rather than the client (Stripe sends from
its own machines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

__all__ = ["RawConnection", "build_post"]


def build_post(host: str, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class RawConnection:
    """One keep-alive connection; requests on it go one after the other."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Sends a prebuilt request; answers the status code and the body."""
        async with self._lock:
            self._writer.write(request)
            head = await self._reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            length = 0
            for header in header_lines:
                name, _, value = header.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await self._reader.readexactly(length) if length else b""
            return status, body

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()
