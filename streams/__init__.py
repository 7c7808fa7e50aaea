"""Event streams: model, Redis publisher, per-process hub, SSE responses, leases, tokens."""

from __future__ import annotations

from .events import TERMINAL_EVENT_TYPES, Event, EventEncodingError, iso_now, isoformat_z
from .frames import Frame, InvalidEventId, parse_stream_id
from .history import Catchup, StreamHistory
from .hub import EventHub, HubClosed, Signal, Subscription
from .leases import StreamLease, StreamLeases, TooManyStreams
from .publisher import EventPublisher
from .pubsub import RedisEndpoint
from .routing import DirectRoutes, StreamHandler
from .sse import (
    TERMINAL_STATUSES,
    AccessCheck,
    EventStreamResponse,
    LeaseSource,
    ReconnectLater,
    Releasable,
    SnapshotProvider,
    StreamOptions,
    StreamRefused,
    last_event_id,
)
from .supervisor import StartingLoop, Supervisor, TaskFailure
from .tokens import ExpiredStreamToken, InvalidStreamToken, StreamGrant, StreamTokens
from .topics import channel_name, operation_topic, stream_key, user_topic

__all__ = [
    "TERMINAL_EVENT_TYPES",
    "TERMINAL_STATUSES",
    "AccessCheck",
    "Catchup",
    "DirectRoutes",
    "Event",
    "EventEncodingError",
    "EventHub",
    "EventPublisher",
    "EventStreamResponse",
    "ExpiredStreamToken",
    "Frame",
    "HubClosed",
    "InvalidEventId",
    "InvalidStreamToken",
    "LeaseSource",
    "ReconnectLater",
    "RedisEndpoint",
    "Releasable",
    "Signal",
    "SnapshotProvider",
    "StartingLoop",
    "StreamGrant",
    "StreamHandler",
    "StreamHistory",
    "StreamLease",
    "StreamLeases",
    "StreamOptions",
    "StreamRefused",
    "StreamTokens",
    "Subscription",
    "Supervisor",
    "TaskFailure",
    "TooManyStreams",
    "channel_name",
    "iso_now",
    "isoformat_z",
    "last_event_id",
    "operation_topic",
    "parse_stream_id",
    "stream_key",
    "user_topic",
]
