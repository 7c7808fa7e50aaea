"""Topic names and the Redis names derived from them."""

from __future__ import annotations

__all__ = ["channel_name", "ends_with_terminal", "operation_topic", "stream_key", "user_topic"]


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
    return f"{prefix}events:{topic}"


def channel_name(prefix: str, topic: str) -> str:
    """The pub/sub channel that announces a topic's new events."""
    return f"{prefix}{topic}"
