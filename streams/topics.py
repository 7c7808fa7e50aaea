"""Topic names and the Redis names derived from them.

Every Redis name of a topic carries the topic as its hash tag (``{op:op_1}``), so that on a
Redis Cluster the topic's Stream and its pub/sub channel live in one slot: the publish script
touches one slot per topic, and the shard that keeps a topic's history is the one that
announces it. On a single Redis the braces are only characters.
"""

from __future__ import annotations

from redis.crc import key_slot

__all__ = [
    "channel_name",
    "ends_with_terminal",
    "operation_topic",
    "stream_key",
    "topic_slot",
    "user_topic",
]


def operation_topic(op_id: str) -> str:
    """The topic of one operation's events."""
    return f"op:{op_id}"


def ends_with_terminal(topic: str) -> bool:
    """Whether a terminal event ends the topic (an operation's), so that nothing follows it;
    a user's topic carries the terminal events of many operations and goes on."""
    return topic.startswith("op:")


def user_topic(user_id: str) -> str:
    """The topic of everything one user may watch (operations and subscriptions)."""
    return f"user:{user_id}"


def stream_key(prefix: str, topic: str) -> str:
    """The Redis Stream that keeps a topic's history."""
    return f"{prefix}events:{{{topic}}}"


def channel_name(prefix: str, topic: str) -> str:
    """The pub/sub channel that announces a topic's new events."""
    return f"{prefix}{{{topic}}}"


def topic_slot(topic: str) -> int:
    """The Redis Cluster slot of every name of ``topic`` (a prefix has no braces, so the hash
    tag is the topic's own)."""
    return key_slot(f"{{{topic}}}".encode())
