"""What uvicorn leaves unbounded on a connection, bounded: the size of a request's headers
(431), the time its headers and its body may take to arrive (408), and the number of open
connections (503, in the API's error body). docs/OPERATIONS.md lists the settings.

Why a subclass of uvicorn's httptools protocol (read in uvicorn 0.54's source):
- httptools has no header size limit: uvicorn feeds it every byte, and it keeps a header
  whole until its end (a 64 MiB header cost 80 MB of memory). h11 has a limit
  (`h11_max_incomplete_event_size`), but uvicorn answers it with a 400, not the 431 of the
  contract, and Lookout serves httptools for its speed on Stripe's webhook bursts.
- uvicorn's only timer is keep-alive, armed once a response is complete and cancelled by the
  next byte that arrives: a connection that sends nothing, or trickles its headers or its body
  a byte at a time, stays open forever (300 held, none closed).
- `limit_concurrency` answers its 503 in plain text; this one answers the error body.

Neither deadline can be an ASGI middleware: headers that never end never reach the app, and
a body the app does not read (an early 401) would still hold the connection. At this level
the body deadline covers only the request's body, so an SSE stream (a GET: its request is
complete as soon as its headers are) is never cut by it; its headers have a deadline as any.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from app.settings import Settings

__all__ = ["MAX_HEADER_BYTES", "ConnectionLimits", "limited_protocol"]

logger = logging.getLogger(__name__)

# The contract's limit, on the request line and headers together (nginx, by default, refuses
# a single header line over 8 KiB).
MAX_HEADER_BYTES = 16 * 1024
# A flood of refused connections must not become a flood of log lines.
_BUSY_LOG_INTERVAL_SECONDS = 10.0
# After a 431 or 408 the rest of what the client sends is read and dropped for this long
# before the socket closes: closing on unread bytes makes the kernel send a reset, which can
# destroy the answer before the client reads it (nginx's lingering_close, for the same reason).
LINGER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_header_bytes: int = MAX_HEADER_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            max_connections=settings.max_connections,
        )


def limited_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to hand to `uvicorn.Config(http=...)`, bound to these limits."""

    class Bound(LimitedHttpToolsProtocol):
        pass

    Bound.limits = limits
    return Bound


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


_BUSY_BODY = _error_body(
    "server_busy", "The server has too many open connections; try again in a moment."
)
_last_busy_log = 0.0


async def _busy(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    global _last_busy_log
    now = time.monotonic()
    if now - _last_busy_log >= _BUSY_LOG_INTERVAL_SECONDS:
        _last_busy_log = now
        logger.warning("over the connection limit: new requests answer 503")
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_BUSY_BODY)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _BUSY_BODY, "more_body": False})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._app = self.app
        # Between the end of one request and the end of the next one's headers.
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # From the connection on: one that sends nothing at all is held as long as one that
        # trickles.
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # refused: dropped unread
        while data and not self.transport.is_closing():
            if not self._awaiting_headers:
                # A body (and, in a pipelined read, what follows it): bounded by one read.
                super().data_received(data)
                return
            if self._header_timer is None:
                # The first byte of a request on a kept-alive connection.
                self._arm_header_timer()
            # The parser is fed no more than the limit allows, so that it never holds more.
            room = self.limits.max_header_bytes - self._header_bytes
            head, data = data[:room], data[room:]
            self._header_bytes += len(head)
            if head:
                super().data_received(head)
            # (Awaiting headers with its count reset: the request ended within `head`, and
            # the rest is the next one's, pipelined.)
            full = self._header_bytes >= self.limits.max_header_bytes
            if data and self._awaiting_headers and full and not self.transport.is_closing():
                self._refuse(
                    431,
                    "headers_too_large",
                    f"The request line and headers may be at most {self.limits.max_header_bytes}"
                    " bytes.",
                )
                return

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        # `connections` counts this one too; uvicorn's own check is left off (no
        # limit_concurrency) so that the 503 is this one.
        over = len(self.connections) > self.limits.max_connections
        self.app = _busy if over else self._app
        super().on_headers_complete()
        self._arm_body_timer_if_running()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel_body_timer()
        self._awaiting_headers = True
        self._header_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request starts only now: its body's time starts now too.
        self._arm_body_timer_if_running()

    # Timers

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout, self._headers_timed_out
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_body_timer_if_running(self) -> None:
        cycle = self.cycle
        if (
            cycle is None
            or not cycle.more_body
            or self._body_timer is not None
            or any(queued is cycle for queued, _ in self.pipeline)
        ):
            return
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._header_bytes == 0:
            # Nothing of a request arrived: there is no one to answer, as at keep-alive's end.
            self.transport.close()
            return
        self._refuse(
            408,
            "request_timeout",
            f"The request's headers did not arrive within {self.limits.header_timeout:g} s.",
        )

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if cycle.response_complete:
            # Answered without reading its body (an early 401, say): the rest of the body
            # would hold the connection.
            self.transport.close()
            return
        if cycle.response_started:
            # The app answers already (a stream, say): let it finish, then close.
            cycle.keep_alive = False
            return
        # The app waits on the body: it now sees the client gone (http.disconnect), and what
        # it might still send is dropped; the 408 is the answer.
        cycle.disconnected = True
        cycle.message_event.set()
        self._refuse(
            408,
            "request_timeout",
            f"The request's body did not arrive within {self.limits.body_timeout:g} s.",
            instead_of=cycle,
        )

    def _refuse(
        self,
        status: int,
        code: str,
        message: str,
        *,
        instead_of: RequestResponseCycle | None = None,
    ) -> None:
        """Answers and closes; only closes while an earlier request of this connection is still
        being answered, since another answer would arrive as its own. `instead_of`: the
        request that is answered by this refusal."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle is instead_of:
            body = _error_body(code, message)
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.extend(
                [
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
            self.transport.write(b"".join(head))
        # Debug only: a flood of slow clients must not become a flood of log lines.
        logger.debug("%s to %s: %s", status, self.client[0] if self.client else "?", message)
        self._cancel_header_timer()
        self._cancel_body_timer()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Our side ends once the answer is sent; the client's is read and dropped until it
        # ends too (eof_received closes) or LINGER_SECONDS have passed.
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
