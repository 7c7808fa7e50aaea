"""The SSE response: subscribe, replay the kept history after the client's position, go live.

A plain ASGI stream (two tasks per connection: the writer and a disconnect watcher) rather
than sse-starlette, whose four tasks per connection cost three times the memory and twice the
time per delivery (see bench/streams_fanout.py). Keep-alives, the duration limit and shutdown
come from the hub's single ticker, so a waiting stream holds no timer of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Final

import anyio
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .abort import TaskAborter
from .events import Event
from .frames import (
    Frame,
    InvalidEventId,
    StreamPosition,
    comment_frame,
    format_stream_id,
    parse_stream_id,
    retry_frame,
)
from .history import Catchup
from .hub import EventHub, HubClosed
from .params import (  # the caller's side, also importable from here as it always was
    TERMINAL_STATUSES,
    Releasable,
    SnapshotProvider,
    StreamOptions,
    last_event_id,
)
from .subscription import Signal, Subscription
from .topics import operation_topic, user_topic

__all__ = [
    "TERMINAL_STATUSES",
    "EventStreamResponse",
    "Releasable",
    "SnapshotProvider",
    "StreamOptions",
    "last_event_id",
]

logger = logging.getLogger(__name__)

_SIGNAL_COMMENTS: Final = {
    Signal.EXPIRED: comment_frame("stream duration limit reached; reconnect to resume"),
    Signal.CLOSED: comment_frame("server shutting down; reconnect to resume"),
}
_KEEPALIVE: Final = comment_frame("keep-alive")


class _Ended(Exception):
    """The stream has said its last word."""


class EventStreamResponse(Response):
    """``text/event-stream`` of one topic.

    ``from_start``: without a position, replay the whole kept history (operation streams);
    otherwise start live. ``end_on_terminal``: close right after a terminal event.
    ``lease``: released when the stream ends (see ``leases``).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        hub: EventHub,
        topic: str,
        *,
        last_event_id: str | None,
        snapshot: SnapshotProvider,
        from_start: bool = False,
        end_on_terminal: bool = False,
        options: StreamOptions | None = None,
        lease: Releasable | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-store", "X-Accel-Buffering": "no", **(headers or {})}
        )
        self._hub = hub
        self._topic = topic
        self._requested = last_event_id
        self._snapshot = snapshot
        self._from_start = from_start
        self._end_on_terminal = end_on_terminal
        self._options = options or StreamOptions()
        self._lease = lease
        self._last: StreamPosition | None = None
        self._sending = False
        self._send: Send | None = None
        self._aborter = TaskAborter()

    @classmethod
    def for_operation(cls, hub: EventHub, op_id: str, **kwargs: Any) -> EventStreamResponse:
        """Whole history of an operation, then live, ending after its terminal event."""
        return cls(hub, operation_topic(op_id), from_start=True, end_on_terminal=True, **kwargs)

    @classmethod
    def for_user(cls, hub: EventHub, user_id: str, **kwargs: Any) -> EventStreamResponse:
        """A user's events, live (replayed after ``last_event_id`` when there is one)."""
        return cls(hub, user_topic(user_id), **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        opts = self._options
        try:
            position = self._initial_position()
            if position is None and not self._from_start and self._requested is None:
                # Live from now: whatever comes after the newest entry, read before subscribing.
                frame = await self._hub.history.last_frame(self._topic)
                position = frame.position if frame is not None else (0, 0)
            sub = self._hub.subscribe(
                self._topic, keepalive=opts.keepalive_seconds, max_seconds=opts.max_seconds
            )
        except (HubClosed, RedisError) as exc:
            # A 200 that ends at once makes EventSource retry (on another instance, or once
            # Redis is back); an error status would make it give up.
            logger.warning("refusing a stream of %s: %s", self._topic, exc)
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            body = retry_frame(opts.retry_ms) + _SIGNAL_COMMENTS[Signal.CLOSED]
            await send({"type": "http.response.body", "body": body, "more_body": False})
            await self._release_lease()
            return
        sub.on_terminal = self._on_terminal
        watcher: asyncio.Task[None] | None = None
        try:
            with self._aborter:
                watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(receive))
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                await self._write(retry_frame(opts.retry_ms))
                try:
                    await self._serve(sub, position)
                except _Ended:
                    pass
                except RedisError as exc:  # the client resumes from its last event
                    logger.warning("stream of %s ends: Redis failed (%s)", self._topic, exc)
                await self._finish()
        finally:
            sub.on_terminal = None
            if watcher is not None:
                watcher.cancel()
            sub.close()
            await self._release_lease()

    async def _release_lease(self) -> None:
        if self._lease is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._lease.release()

    def _initial_position(self) -> StreamPosition | None:
        if self._requested is None:
            return None
        try:
            return parse_stream_id(self._requested)
        except InvalidEventId:
            return None  # a history that cannot be placed: answered with stream.reset

    async def _serve(self, sub: Subscription, position: StreamPosition | None) -> None:
        with anyio.move_on_after(self._options.ready_timeout) as waited:
            await sub.ready()
        if waited.cancelled_caught:
            await self._write(comment_frame("event source unavailable; reconnect later"))
            return
        self._last = position
        if self._requested is not None and position is None:
            await self._reset(None, None, False)
        else:
            await self._catch_up()
        while True:
            item = await sub.receive()
            if isinstance(item, list):
                await self._write_frames(item)
            elif item is Signal.IDLE:
                await self._write(_KEEPALIVE)
            elif item is Signal.RESYNC:
                await self._catch_up()
            else:
                comment = _SIGNAL_COMMENTS.get(item)
                if comment is not None:
                    await self._write(comment)
                return

    async def _catch_up(self) -> None:
        """Send what the Stream kept after the last position; report a gap with a reset."""
        while True:
            page: Catchup = await self._hub.history.read_after(
                self._topic, self._last, limit=self._options.history_page
            )
            if page.reset:
                await self._reset(page.last, page.last_terminal, True)
                return
            await self._write_frames(page.frames)
            if not page.more:
                return

    async def _reset(
        self, last: StreamPosition | None, last_terminal: bool | None, known: bool
    ) -> None:
        if not known:
            page = await self._hub.history.read_after(self._topic, None, limit=1)
            last, last_terminal = page.last, page.last_terminal
        try:
            snapshot = dict(await self._snapshot(self._topic))
        except Exception:
            logger.exception("snapshot of %s failed; ending the stream", self._topic)
            raise _Ended from None
        fields: dict[str, Any] = {"snapshot": snapshot}
        kind, _, subject = self._topic.partition(":")
        fields["operation_id" if kind == "op" else f"{kind}_id"] = subject
        event = Event.create("stream.reset", **fields)
        stream_id = b"" if last is None else b"id: " + format_stream_id(last).encode() + b"\n"
        await self._write(stream_id + b"event: stream.reset\ndata: " + event.encode() + b"\n\n")
        self._last = last if last is not None else (0, 0)
        if self._end_on_terminal and (last_terminal or snapshot.get("status") in TERMINAL_STATUSES):
            raise _Ended

    async def _write_frames(self, frames: list[Frame]) -> None:
        last = self._last
        chunks: list[bytes] = []
        ended = False
        for frame in frames:
            if last is not None and frame.position <= last:
                continue  # already sent from history
            chunks.append(frame.wire)
            last = frame.position
            if frame.terminal and self._end_on_terminal:
                ended = True
                break
        self._last = last
        if chunks:
            await self._write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended:
            raise _Ended

    async def _write(self, data: bytes) -> None:
        assert self._send is not None
        self._sending = True
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            self._sending = False

    async def _finish(self) -> None:
        assert self._send is not None
        # A slow client may not take even this; it is cut off below (the client resumes).
        with anyio.move_on_after(1):
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def _on_terminal(self, signal: Signal) -> None:
        # Overflow, expiry or shutdown while the writer waits on a full socket: stop waiting.
        if self._sending:
            self._aborter.abort()

    async def _watch_disconnect(self, receive: Receive) -> None:
        try:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:  # a server that cannot tell us any more: treat it as gone
            logger.debug("receive() failed on %s", self._topic, exc_info=True)
        self._aborter.abort()
