"""What a caller gives an SSE stream: its options, the client's position from the request, a
snapshot of the topic's subject for ``stream.reset``, and how to take the lease it holds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Scope

__all__ = [
    "AccessCheck",
    "LeaseSource",
    "Releasable",
    "SnapshotProvider",
    "StreamOptions",
    "StreamRefused",
    "last_event_id",
]


class SnapshotProvider(Protocol):
    """The current state of a topic's subject, sent in ``stream.reset`` when history is lost."""

    async def __call__(self, topic: str) -> Mapping[str, Any]: ...


class AccessCheck(Protocol):
    """Whether the client may still listen (say, the credential it opened the stream with was
    not withdrawn): asked every ``StreamOptions.recheck_seconds``; False ends the stream, and
    so do errors for ``recheck_grace_seconds``. The stream layer knows nothing of what the
    credential is."""

    async def __call__(self) -> bool: ...


class Releasable(Protocol):
    async def release(self) -> None: ...


# Takes a stream's lease (its place in the user's limit), as the stream starts.
LeaseSource = Callable[[], Awaitable[Releasable]]


class StreamRefused(Exception):
    """Raised by a ``LeaseSource`` to answer ``response`` (e.g. a 429) instead of the stream."""

    def __init__(self, response: ASGIApp, reason: str) -> None:
        super().__init__(reason)
        self.response = response


@dataclass(frozen=True, slots=True)
class StreamOptions:
    keepalive_seconds: float = 15.0
    retry_ms: int = 3000
    max_seconds: float | None = 3600.0
    ready_timeout: float = 10.0
    history_page: int = 500
    # How often a stream with an AccessCheck asks it again (within one hub tick), and how long
    # it goes on without a True answer while the check fails (an outage) before it ends: a
    # client whose access was withdrawn is gone within twice recheck plus a tick (21 s) either way.
    recheck_seconds: float = 10.0
    recheck_grace_seconds: float = 15.0
    # The snapshot ``status`` values after which a subject publishes nothing more, in the
    # caller's vocabulary: a stream that ends on its terminal event ends at such a snapshot too.
    final_statuses: frozenset[str] = frozenset()


def last_event_id(scope: Scope) -> str | None:
    """The client's position: the ``Last-Event-ID`` header, else ``?last_event_id=``."""
    for name, value in scope.get("headers", ()):
        if name == b"last-event-id":
            return str(value.decode("latin-1").strip()) or None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("last_event_id")
    return values[0].strip() or None if values else None
