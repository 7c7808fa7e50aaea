"""The hub's Redis backend: one pub/sub connection kept in step with the hub's channels.

The link reconnects with exponential backoff and re-subscribes every channel its listener
wants; it pipelines SUBSCRIBE, UNSUBSCRIBE and PING and matches their replies in order (Redis
answers them in the order sent), which tells when a channel is confirmed and when the
connection is ready; and it hands every message to the listener. Which channels are wanted,
and who listens on them, is the hub's business (``hub``); this is the wire.
"""

from __future__ import annotations

import logging
from collections import deque

import anyio
import hiredis

from .backend import BackendListener, ChannelHandle
from .pubsub import PubSubConnection, PubSubError, RedisEndpoint, encode_command

__all__ = ["RedisLink"]

logger = logging.getLogger(__name__)

_CONNECTION_ERRORS = (
    OSError,
    hiredis.ProtocolError,  # bytes that are not RESP: not a Redis, or a stream out of step
    TimeoutError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    PubSubError,
)
_SUBSCRIBE_BATCH = 512
# Markers in the FIFO of replies the hub waits for (one per channel of each command).
_UNSUBSCRIBED = "unsubscribed"
_PONG = "pong"
_READY = "ready"


class RedisLink:
    """A ``HubBackend`` on one Redis pub/sub connection.

    The listener's ``resynced`` is called once the connection is ready again after a
    reconnect, when every channel is subscribed anew: whatever was published in between is
    only in the Streams.
    """

    def __init__(
        self,
        endpoint: RedisEndpoint,
        *,
        name: str,
        ping_seconds: float = 5.0,
        backoff: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self._endpoint = endpoint
        self._name = name
        self._ping = ping_seconds
        self._backoff = backoff
        self._acks: deque[ChannelHandle | str] = deque()
        self._outbox: list[bytes] = []
        self._outbox_ready = anyio.Event()
        self._conn: PubSubConnection | None = None
        self._connected = anyio.Event()
        self._closed = False
        # Served before (also before a crash and restart): what was published while away is
        # only in the Streams, so subscribers resync once the next connection is ready.
        self._served = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def live(self) -> bool:
        """Connected and ready, so that a keep-alive PING is worth sending."""
        return self._conn is not None and self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def subscribe(self, channel: ChannelHandle) -> None:
        # Without a connection the next one subscribes the whole table anyway.
        if self._conn is not None:
            self._queue_command(encode_command("SUBSCRIBE", channel.name), [channel])

    def unsubscribe(self, name: bytes) -> None:
        if self._conn is not None:
            self._queue_command(encode_command("UNSUBSCRIBE", name), [_UNSUBSCRIBED])

    def ping(self) -> None:
        self._queue_command(encode_command("PING"), [_PONG])

    def close(self) -> None:
        """Stop reconnecting."""
        self._closed = True

    async def run(self, listener: BackendListener) -> None:
        """Connect, serve, and reconnect with backoff, until ``close()``."""
        delay = self._backoff[0]
        while not self._closed:
            try:
                conn = await PubSubConnection.connect(self._endpoint, name=self._name)
            except _CONNECTION_ERRORS as exc:
                logger.warning("event hub cannot reach Redis (%s); retrying in %.1fs", exc, delay)
            else:
                delay = self._backoff[0]
                async with conn:
                    resync, self._served = self._served, True
                    await self._serve(conn, listener, resync=resync)
                if self._closed:
                    return
                logger.warning("event hub lost Redis; reconnecting in %.1fs", delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _serve(
        self, conn: PubSubConnection, listener: BackendListener, *, resync: bool
    ) -> None:
        self._acks.clear()
        self._outbox.clear()
        self._conn = conn
        channels = list(listener.channels())
        for start in range(0, len(channels), _SUBSCRIBE_BATCH):
            batch = channels[start : start + _SUBSCRIBE_BATCH]
            self._queue_command(encode_command("SUBSCRIBE", *(c.name for c in batch)), batch)
        # The PING's answer comes after every re-subscription's: then nothing more is missed.
        self._queue_command(encode_command("PING"), [_READY if resync else _PONG])
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_loop, conn, tg.cancel_scope)
                try:
                    await self._read_loop(conn, listener)
                except _CONNECTION_ERRORS as exc:
                    logger.info("event hub connection ended: %r", exc)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._conn = None
            if self._connected.is_set():
                self._connected = anyio.Event()

    def _queue_command(self, command: bytes, acks: list[ChannelHandle] | list[str]) -> None:
        self._outbox.append(command)
        self._acks.extend(acks)
        self._outbox_ready.set()

    async def _write_loop(self, conn: PubSubConnection, scope: anyio.CancelScope) -> None:
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready = anyio.Event()
                data, self._outbox = b"".join(self._outbox), []
                await conn.send(data)
        except _CONNECTION_ERRORS as exc:
            logger.info("event hub could not write to Redis: %r", exc)
            scope.cancel()

    async def _read_loop(self, conn: PubSubConnection, listener: BackendListener) -> None:
        deliver = listener.deliver
        silence = max(self._ping * 3, 1.0)
        while True:
            with anyio.fail_after(silence):
                replies = await conn.receive()
            now = anyio.current_time()
            for reply in replies:
                if type(reply) is list and reply and reply[0] == b"message":
                    if len(reply) == 3 and type(reply[1]) is bytes and type(reply[2]) is bytes:
                        deliver(reply[1], reply[2], now)
                    else:
                        # Someone PUBLISHed by hand, or a server of another kind answers.
                        listener.skipped("a message of an unknown shape", reply[1:])
                else:
                    self._acknowledge(reply, listener)

    def _acknowledge(self, reply: object, listener: BackendListener) -> None:
        if not self._acks:
            raise PubSubError(f"unexpected reply on the hub's connection: {reply!r}")
        expected = self._acks.popleft()
        if not isinstance(expected, str):
            listener.confirmed(expected)
        elif expected in (_READY, _PONG) and not self._connected.is_set():
            self._connected.set()
            if expected == _READY:
                listener.resynced()
