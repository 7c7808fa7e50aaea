"""Event streams: model, Redis publisher, per-process hub, SSE responses, leases, tokens.

The face holds what the layers above call; everything else is imported from its module.
"""

from __future__ import annotations

from .cluster import ClusterClient, RedisClient
from .connection import PackedConnection
from .events import Event, isoformat_z
from .hub import EventHub
from .leases import StreamLease, StreamLeases, TooManyStreams
from .params import (
    AccessCheck,
    LeaseSource,
    StreamOptions,
    StreamRefused,
    last_event_id,
)
from .publisher import EventPublisher
from .routing import DirectRoutes, StreamHandler
from .sse import EventStreamResponse, ReconnectLater
from .supervisor import Supervisor
from .tokens import InvalidStreamToken, StreamTokens
from .topics import channel_name, operation_topic, stream_key, user_topic

__all__ = [
    "AccessCheck",
    "ClusterClient",
    "DirectRoutes",
    "Event",
    "EventHub",
    "EventPublisher",
    "EventStreamResponse",
    "InvalidStreamToken",
    "LeaseSource",
    "PackedConnection",
    "ReconnectLater",
    "RedisClient",
    "StreamHandler",
    "StreamLease",
    "StreamLeases",
    "StreamOptions",
    "StreamRefused",
    "StreamTokens",
    "Supervisor",
    "TooManyStreams",
    "channel_name",
    "isoformat_z",
    "last_event_id",
    "operation_topic",
    "stream_key",
    "user_topic",
]
