"""Server-Sent Events frames, encoded once and shared by every client of a topic."""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "Frame",
    "InvalidEventId",
    "StreamPosition",
    "comment_frame",
    "format_stream_id",
    "parse_stream_id",
    "retry_frame",
]

# A Redis Stream id "<ms>-<seq>" as a tuple, so that positions compare in stream order.
StreamPosition = tuple[int, int]

_STREAM_ID: Final = re.compile(r"(\d{1,20})-(\d{1,20})")
_EVENT_TYPE: Final = re.compile(rb"[!-~]{1,100}")  # printable ASCII, no space
_MAX_PART: Final = 2**64 - 1


class InvalidEventId(ValueError):
    """A ``Last-Event-ID`` that is not an id this server sent."""


def parse_stream_id(text: str | bytes) -> StreamPosition:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; raises InvalidEventId otherwise."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    match = _STREAM_ID.fullmatch(text.strip())
    if match is None:
        raise InvalidEventId(
            f"event id {text[:40]!r} is not of the form <ms>-<seq>; "
            "send back the id of the last event received, or none"
        )
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX_PART or seq > _MAX_PART:
        raise InvalidEventId(f"event id {text[:40]!r} is out of range")
    return ms, seq


def format_stream_id(position: StreamPosition) -> str:
    return f"{position[0]}-{position[1]}"


def comment_frame(text: str) -> bytes:
    """A comment line (ignored by EventSource; keeps proxies and the connection alive)."""
    line = text.replace("\r", " ").replace("\n", " ")
    return f": {line}\n\n".encode()


def retry_frame(milliseconds: int) -> bytes:
    return f"retry: {int(milliseconds)}\n\n".encode()


class Frame:
    """One event of one topic: its Stream id, type, JSON and the SSE bytes sent for it.

    ``terminal``: the event ends its topic (its type is one of the terminal types the caller
    named: ``EventHub(terminal_types=...)``)."""

    __slots__ = ("data", "id", "position", "terminal", "type", "wire")

    def __init__(
        self, stream_id: bytes, event_type: bytes, data: bytes, *, terminal: bool = False
    ) -> None:
        self.id = stream_id.decode()
        self.position = parse_stream_id(self.id)
        self.type = event_type.decode()
        self.data = data
        self.terminal = terminal
        # JSON never holds a raw newline, so the data is one "data:" line (docs/API.md).
        self.wire = b"".join(
            (b"id: ", stream_id, b"\nevent: ", event_type, b"\ndata: ", data, b"\n\n")
        )

    @classmethod
    def from_announcement(cls, payload: bytes, terminal_types: frozenset[bytes]) -> Frame:
        """From a pub/sub announcement "<id>\\n<type>\\n<json>" (see publisher); raises
        ValueError for anything else (a hand-typed PUBLISH), which would break the SSE framing."""
        parts = payload.split(b"\n", 2)
        if len(parts) != 3:
            raise ValueError("an announcement has three lines: id, type, JSON object")
        stream_id, event_type, data = parts
        # Checks that cost no parse: one line of a JSON object, a type of printable ASCII.
        if not (data.startswith(b"{") and data.endswith(b"}")) or b"\n" in data or b"\r" in data:
            raise ValueError("an announcement's data is one line of a JSON object")
        if _EVENT_TYPE.fullmatch(event_type) is None:
            raise ValueError("an announcement's type is printable ASCII")
        return cls(stream_id, event_type, data, terminal=event_type in terminal_types)

    def __repr__(self) -> str:
        return f"Frame(id={self.id!r}, type={self.type!r})"
