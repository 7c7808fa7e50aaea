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
from .hub import EventHub, HubClosed, Signal, Subscription
from .params import (  # the caller's side, also importable from here as it always was
    AccessCheck,
    LeaseSource,
    Releasable,
    SnapshotProvider,
    StreamOptions,
    StreamRefused,
    last_event_id,
)
from .topics import operation_topic, user_topic

__all__ = [
    "AccessCheck",
    "EventStreamResponse",
    "LeaseSource",
    "ReconnectLater",
    "Releasable",
    "SnapshotProvider",
    "StreamOptions",
    "StreamRefused",
    "last_event_id",
]

logger = logging.getLogger(__name__)

_SIGNAL_COMMENTS: Final = {
    Signal.EXPIRED: comment_frame("stream duration limit reached; reconnect to resume"),
    Signal.CLOSED: comment_frame("server shutting down; reconnect to resume"),
}
_KEEPALIVE: Final = comment_frame("keep-alive")
_UNAVAILABLE: Final = comment_frame("event source unavailable; reconnect later")
_WITHDRAWN: Final = comment_frame("access withdrawn; this stream ends")
_HEADERS: Final = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _reconnect_body(retry_ms: int, comment: bytes = _UNAVAILABLE) -> bytes:
    """A whole stream that only says when to come back."""
    return retry_frame(retry_ms) + comment


class ReconnectLater(Response):
    """A stream that cannot be served now (Redis or the database unreachable): 200 with
    ``retry:`` and an immediate end makes every EventSource reconnect (on another instance, or
    once the server is back), where an error status would make it give up for good."""

    media_type = "text/event-stream"

    def __init__(self, retry_ms: int = StreamOptions().retry_ms) -> None:
        super().__init__(_reconnect_body(retry_ms), headers=_HEADERS)


class _Ended(Exception):
    """The stream has said its last word."""


class EventStreamResponse(Response):
    """``text/event-stream`` of one topic.

    ``from_start``: without a position, replay the whole kept history (operation streams);
    otherwise start live. ``end_on_terminal``: close right after a terminal event.
    ``take_lease``: takes the stream's place in its user's limit (see ``leases``) as the stream
    starts; it is released when the stream ends, however it ends. It may raise
    ``StreamRefused`` to answer with another response (a 429) instead.
    ``still_allowed``: asked every ``options.recheck_seconds``; the stream ends when it answers
    False, or when it has not answered True for ``options.recheck_grace_seconds`` (a check that
    cannot be made does not keep a revoked client listening for long, nor does one failed check
    during a database failover end every stream at once).
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
        take_lease: LeaseSource | None = None,
        still_allowed: AccessCheck | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({**_HEADERS, **(headers or {})})
        self._hub = hub
        self._topic = topic
        self._requested = last_event_id
        self._snapshot = snapshot
        self._from_start = from_start
        self._end_on_terminal = end_on_terminal
        self._options = options or StreamOptions()
        self._take_lease = take_lease
        self._still_allowed = still_allowed
        # The caller checked the client's access as it opened the stream.
        self._allowed_at = 0.0
        self._last: StreamPosition | None = None
        self._unplaceable = False
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
        lease: Releasable | None = None
        sub: Subscription | None = None
        watcher: asyncio.Task[None] | None = None
        # Everything from taking the lease on runs in this block, whose `finally` gives the
        # lease back: a lease left behind would be renewed for as long as the process lives.
        try:
            with self._aborter:
                try:
                    if self._take_lease is not None:
                        # Not abortable: a command Redis already received would take the place
                        # after we stopped waiting, and nobody would give it back for a ttl.
                        lease = await self._take_lease()
                    # From here a client that goes away ends the stream, even while Redis
                    # stalls the reads that start it.
                    watcher = asyncio.get_running_loop().create_task(
                        self._watch_disconnect(receive)
                    )
                    position = await self._start_position()
                    self._allowed_at = anyio.current_time()
                    sub = self._hub.subscribe(
                        self._topic,
                        keepalive=opts.keepalive_seconds,
                        max_seconds=opts.max_seconds,
                        recheck_seconds=(
                            opts.recheck_seconds if self._still_allowed is not None else None
                        ),
                    )
                except StreamRefused as refused:
                    await refused.response(scope, receive, send)
                    return
                except (HubClosed, RedisError) as exc:
                    # A 200 that ends at once makes EventSource retry (on another instance, or
                    # once Redis is back); an error status would make it give up.
                    logger.warning("refusing a stream of %s: %s", self._topic, exc)
                    closing = isinstance(exc, HubClosed)
                    body = _reconnect_body(
                        opts.retry_ms, _SIGNAL_COMMENTS[Signal.CLOSED] if closing else _UNAVAILABLE
                    )
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                    )
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
                sub.on_terminal = self._on_terminal
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
            if sub is not None:
                sub.on_terminal = None
                sub.close()
            if watcher is not None:
                watcher.cancel()
            if lease is not None:
                await self._release(lease)

    async def _release(self, lease: Releasable) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await lease.release()
            except RedisError as exc:  # it lapses after the lease ttl, no longer renewed
                logger.warning("could not release a stream lease of %s: %s", self._topic, exc)

    async def _start_position(self) -> StreamPosition | None:
        """Where the stream starts: after the client's position; else from the very start
        (``from_start``), else after the newest id the Stream has generated (live). ``None``:
        from the start of the Stream, which for a live stream holds only what came since."""
        if self._requested is not None:
            try:
                return parse_stream_id(self._requested)
            except InvalidEventId:
                self._unplaceable = True  # a history that cannot be placed: stream.reset
                return None
        if self._from_start:
            return None
        return await self._hub.history.head(self._topic)

    async def _serve(self, sub: Subscription, position: StreamPosition | None) -> None:
        with anyio.move_on_after(self._options.ready_timeout) as waited:
            await sub.ready()
        if waited.cancelled_caught:
            await self._write(_UNAVAILABLE)
            return
        self._last = position
        if self._unplaceable:
            await self._reset(None, None, False)
        else:
            await self._catch_up()
        send = self._send
        assert send is not None
        while True:
            item = await sub.receive()
            if isinstance(item, list):
                last = self._last
                if self._end_on_terminal or not (last is None or item[0].position > last):
                    await self._write_frames(item)
                    continue
                # Live frames, all new (a batch is in Stream order), on a stream that does not
                # end with them: written here, as one chunk. This runs once per event per
                # client (2,000 clients at 50,000 deliveries/s, bench/streams_fanout.py): two
                # coroutines fewer per delivery than _write_frames and _write.
                self._last = item[-1].position
                data = item[0].wire if len(item) == 1 else b"".join([f.wire for f in item])
                self._sending = True
                try:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                finally:
                    self._sending = False
            elif item is Signal.IDLE:
                await self._write(_KEEPALIVE)
            elif item is Signal.RESYNC:
                # The hub was away: catch up from the Stream; a reset only for a real gap.
                await self._catch_up()
            elif item is Signal.RECHECK:
                if not await self._allowed():
                    await self._write(_WITHDRAWN)
                    return
            else:
                comment = _SIGNAL_COMMENTS.get(item)
                if comment is not None:
                    await self._write(comment)
                return

    async def _allowed(self) -> bool:
        assert self._still_allowed is not None
        try:
            if await self._still_allowed():
                self._allowed_at = anyio.current_time()
                return True
            return False
        except Exception as exc:
            since = anyio.current_time() - self._allowed_at
            # Debug only: an outage fails every stream's check at once (the caller logs it).
            logger.debug("access check of a stream of %s failed: %r", self._topic, exc)
            return since < self._options.recheck_grace_seconds

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
        # Resume after what the snapshot covers; without a Stream, from its start once it exists.
        self._last = last
        if self._end_on_terminal and (
            last_terminal or snapshot.get("status") in self._options.final_statuses
        ):
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
