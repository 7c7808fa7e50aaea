"""The hub's Redis backend: one pub/sub connection kept in step with the hub's channels.

The link reconnects with exponential backoff and re-subscribes every channel its listener
wants; it pipelines SUBSCRIBE, UNSUBSCRIBE and PING and matches their replies in order (Redis
answers them in the order sent), which tells when a channel is confirmed and when the
connection is ready; and it hands every message to the listener. Which channels are wanted,
and who listens on them, is the hub's business (``hub``); this is the wire.

On a Redis Cluster one link runs per primary (``cluster.ClusterLink``) in sharded mode:
SSUBSCRIBE and SUNSUBSCRIBE, ``smessage``, re-subscriptions batched per slot, and what a
node says when it no longer serves a channel's slot (a ``MOVED`` answer, a ``sunsubscribe``
nobody asked for) reported to ``ShardEvents`` instead of ending the connection.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
import hiredis
from redis.crc import key_slot

from .backend import BackendListener, ChannelHandle
from .pubsub import PubSubConnection, PubSubError, RedisEndpoint, encode_command

__all__ = ["RedisLink", "ShardEvents"]

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
_PONG = b"pong"


class ShardEvents(Protocol):
    """What a sharded link reports besides its listener's business: its node no longer serves
    a channel's slot (it moved to another node, or the node became a replica)."""

    def refused(self, channels: Sequence[ChannelHandle], error: str) -> None:
        """The node answered a subscription with an error (``MOVED``, ``CLUSTERDOWN``, …)."""
        ...

    def dropped(self, name: bytes) -> None:
        """The node ended a subscription of its own accord (its slot migrated away)."""
        ...

    def lost(self) -> None:
        """The node cannot be reached (it may be failing over): the link keeps trying it."""
        ...


@dataclass(slots=True)
class _Sent:
    """A command whose replies are awaited, in the order Redis answers."""

    kind: bytes  # the kind of reply it gets: b"subscribe", b"sunsubscribe", b"pong", …
    channels: Sequence[ChannelHandle] = ()  # a subscription's: one reply each, in order
    name: bytes = b""  # an unsubscription's
    got: int = 0
    # The PING after a (re)subscription: its answer makes the connection ready, and these
    # channels (None: a first connection) resync.
    ready: bool = False
    resync: Collection[ChannelHandle] | None = None


class RedisLink:
    """A ``HubBackend`` on one Redis pub/sub connection.

    The listener's ``resynced`` is called once the connection is ready again after a
    reconnect, when every channel is subscribed anew: whatever was published in between is
    only in the Streams. ``shard``: sharded pub/sub on one node of a cluster (see the module).
    """

    def __init__(
        self,
        endpoint: RedisEndpoint,
        *,
        name: str,
        ping_seconds: float = 5.0,
        backoff: tuple[float, float] = (0.1, 5.0),
        shard: ShardEvents | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._name = name
        self._ping = ping_seconds
        self._backoff = backoff
        self._shard = shard
        prefix = "S" if shard is not None else ""
        self._subscribe = f"{prefix}SUBSCRIBE"
        self._unsubscribe = f"{prefix}UNSUBSCRIBE"
        self._subscribed = self._subscribe.lower().encode()
        self._unsubscribed = self._unsubscribe.lower().encode()
        self._message = b"smessage" if shard is not None else b"message"
        self._sent: deque[_Sent] = deque()
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
            command = encode_command(self._subscribe, channel.name)
            self._queue_command(command, _Sent(self._subscribed, channels=(channel,)))

    def unsubscribe(self, name: bytes) -> None:
        if self._conn is not None:
            command = encode_command(self._unsubscribe, name)
            self._queue_command(command, _Sent(self._unsubscribed, name=name))

    def ping(self) -> None:
        self._queue_command(encode_command("PING"), _Sent(_PONG))

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
                logger.warning(
                    "event hub cannot reach Redis at %s (%s); retrying in %.1fs",
                    self._endpoint.address,
                    exc,
                    delay,
                )
                if self._shard is not None:
                    self._shard.lost()
            else:
                delay = self._backoff[0]
                async with conn:
                    resync, self._served = self._served, True
                    await self._serve(conn, listener, resync=resync)
                if self._closed:
                    return
                logger.warning(
                    "event hub lost Redis at %s; reconnecting in %.1fs",
                    self._endpoint.address,
                    delay,
                )
                if self._shard is not None:
                    self._shard.lost()
            await anyio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    def _batches(self, channels: Sequence[ChannelHandle]) -> Iterator[Sequence[ChannelHandle]]:
        """Re-subscriptions, pipelined in batches; sharded, one slot per batch (a cluster
        refuses an SSUBSCRIBE across slots)."""
        groups: Collection[Sequence[ChannelHandle]] = [channels]
        if self._shard is not None:
            by_slot: dict[int, list[ChannelHandle]] = {}
            for channel in channels:
                by_slot.setdefault(key_slot(channel.name), []).append(channel)
            groups = by_slot.values()
        for group in groups:
            for start in range(0, len(group), _SUBSCRIBE_BATCH):
                yield group[start : start + _SUBSCRIBE_BATCH]

    async def _serve(
        self, conn: PubSubConnection, listener: BackendListener, *, resync: bool
    ) -> None:
        self._sent.clear()
        self._outbox.clear()
        self._conn = conn
        channels = list(listener.channels())
        for batch in self._batches(channels):
            command = encode_command(self._subscribe, *(c.name for c in batch))
            self._queue_command(command, _Sent(self._subscribed, channels=batch))
        # The PING's answer comes after every re-subscription's: then nothing more is missed.
        ready = _Sent(_PONG, ready=True, resync=channels if resync else None)
        self._queue_command(encode_command("PING"), ready)
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

    def _queue_command(self, command: bytes, sent: _Sent) -> None:
        self._outbox.append(command)
        self._sent.append(sent)
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
        message = self._message
        silence = max(self._ping * 3, 1.0)
        while True:
            with anyio.fail_after(silence):
                replies = await conn.receive()
            now = anyio.current_time()
            for reply in replies:
                if type(reply) is list and reply and reply[0] == message:
                    if len(reply) == 3 and type(reply[1]) is bytes and type(reply[2]) is bytes:
                        deliver(reply[1], reply[2], now)
                    else:
                        # Someone PUBLISHed by hand, or a server of another kind answers.
                        listener.skipped("a message of an unknown shape", reply[1:])
                else:
                    self._acknowledge(reply, listener)

    def _acknowledge(self, reply: object, listener: BackendListener) -> None:
        """A reply that is not a message: the answer to the oldest command still waiting, or
        (sharded) a node's own ``sunsubscribe``."""
        if isinstance(reply, hiredis.ReplyError):
            self._refused(reply)
            return
        if type(reply) is list and reply and type(reply[0]) is bytes:
            kind, name = reply[0], reply[1] if len(reply) > 1 else b""
        else:
            kind, name = (_PONG if reply == b"PONG" else b""), b""
        sent = self._sent[0] if self._sent else None
        if kind == self._unsubscribed:
            if sent is not None and sent.kind == kind and sent.name == name:
                self._sent.popleft()
            elif self._shard is not None and type(name) is bytes:
                # Nobody asked: the node no longer serves the channel's slot.
                self._shard.dropped(name)
            else:
                raise PubSubError(f"unexpected reply on the hub's connection: {reply!r}")
            return
        if sent is None or sent.kind != kind:
            raise PubSubError(f"unexpected reply on the hub's connection: {reply!r}")
        if sent.channels:
            channel = sent.channels[sent.got]
            sent.got += 1
            if sent.got == len(sent.channels):
                self._sent.popleft()
            listener.confirmed(channel)
            return
        self._sent.popleft()
        if sent.ready and not self._connected.is_set():
            self._connected.set()
            if sent.resync is not None:
                listener.resynced(sent.resync)

    def _refused(self, error: hiredis.ReplyError) -> None:
        sent = self._sent.popleft() if self._sent else None
        if sent is None or self._shard is None or sent.kind == _PONG:
            raise PubSubError(f"Redis answered the hub's pub/sub connection: {error}")
        if sent.channels:
            # An error is the whole command's one answer: none of its channels is subscribed.
            self._shard.refused(sent.channels[sent.got :], str(error))
        # A refused SUNSUBSCRIBE: the node no longer serves the slot, nor the subscription.
