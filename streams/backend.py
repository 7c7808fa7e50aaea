"""The interface between the hub and whatever carries its channels (encode/broadcaster's
``_backends/base.py``): the hub asks a ``HubBackend`` to keep channels subscribed, and the
backend reports back to a ``BackendListener`` (the hub) what arrived. ``link.RedisLink`` (one
Redis) and ``cluster.ClusterLink`` (a Redis Cluster, sharded pub/sub) implement it; tests or
another transport may bring their own.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

__all__ = ["BackendListener", "ChannelHandle", "HubBackend"]


class ChannelHandle(Protocol):
    """A channel as the backend sees it: a name, and otherwise opaque. The backend hands the
    same object back when the channel is confirmed, so that a confirmation of an earlier
    subscription to the same name is not mistaken for the current one's."""

    @property
    def name(self) -> bytes: ...


class BackendListener(Protocol):
    """What a backend reports to. Every method is synchronous: called on the read path."""

    def channels(self) -> Collection[ChannelHandle]:
        """Every channel wanted now, subscribed anew after each (re)connection."""
        ...

    def confirmed(self, channel: ChannelHandle) -> None:
        """The backend confirmed a subscription: nothing published from now on is missed."""
        ...

    def deliver(self, name: bytes, payload: bytes, now: float) -> None:
        """A message arrived on channel ``name`` (perhaps one nobody wants any more)."""
        ...

    def skipped(self, why: str, detail: object) -> None:
        """A message arrived that is not one, and was skipped."""
        ...

    def resynced(self, channels: Collection[ChannelHandle]) -> None:
        """``channels`` are subscribed again after a gap (a reconnect; on a cluster, a slot
        that moved): what was published on them meanwhile was not delivered."""
        ...


class HubBackend(Protocol):
    """What the hub needs from the transport behind it."""

    @property
    def connected(self) -> bool: ...

    @property
    def live(self) -> bool:
        """Connected and ready, so that a keep-alive ping is worth sending."""
        ...

    async def wait_connected(self) -> None: ...

    def subscribe(self, channel: ChannelHandle) -> None:
        """Subscribe ``channel`` now if connected (else the next connection does)."""
        ...

    def unsubscribe(self, name: bytes) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None:
        """Stop reconnecting; ``run`` returns."""
        ...

    async def run(self, listener: BackendListener) -> None:
        """Connect, serve and reconnect until ``close()``, reporting to ``listener``."""
        ...
