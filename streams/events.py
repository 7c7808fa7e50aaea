"""The event model shared by publishers, the hub and the SSE responses."""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, cast

import orjson

__all__ = [
    "Event",
    "EventEncodingError",
    "iso_now",
    "isoformat_z",
    "new_event_key",
]


class EventEncodingError(TypeError):
    """An event's data cannot be written as JSON."""


def isoformat_z(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` suffix, millisecond precision, as every JSON time is."""
    if moment.tzinfo is None:
        raise ValueError("isoformat_z needs an aware datetime; pass tzinfo=UTC")
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _jsonable(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, datetime):
        return isoformat_z(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# orjson writes an event's compact UTF-8 JSON in a tenth of the time of the json module (2.7 µs
# against 0.2 µs for a progress event: a tenth of the publisher's CPU per event, bench.publisher)
# and, for the data it accepts, the same JSON (a float may be spelt differently: 1e-7, not 1e-07).
# Datetimes and dataclasses are passed to _jsonable, as the json module does, so that a
# datetime keeps isoformat_z's form and a dataclass stays unencodable. Unlike the json module,
# orjson writes NaN and infinities as null (the json module wrote NaN, which is not JSON and
# which a browser's JSON.parse refuses), and writes an Enum or a UUID as its value.
_ORJSON_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
# What orjson refuses and the json module wrote (keys that are not str, integers beyond 64 bits)
# goes to the json module, which writes it as before or raises EventEncodingError. Built once:
# json.dumps with any non-default option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_jsonable)


# The text of the current millisecond, and of the current second formatted once a second:
# every event's "ts" is read here, and the events of a burst share their milliseconds
# (formatting a datetime was a tenth of a progress event's cost in the publisher).
_second: tuple[int, str] = (0, "")
_milli: tuple[int, str] = (0, "")


def iso_now() -> str:
    """The current time as ISO 8601 UTC with ``Z`` (as ``isoformat_z``)."""
    global _second, _milli
    milli = int(time.time() * 1000)
    if _milli[0] == milli:
        return _milli[1]
    second, ms = divmod(milli, 1000)
    if _second[0] != second:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    text = f"{_second[1]}.{ms:03d}Z"
    _milli = (milli, text)
    return text


def _process_prefix() -> str:
    return base64.urlsafe_b64encode(os.urandom(9)).decode()


# Keys are this process's random prefix (72 bits, drawn again in a forked child) and a count:
# unique without a system call per event (os.urandom per key cost 0.65 us, a third of making a
# progress event).
_key_prefix = _process_prefix()
_key_count = itertools.count()


def _after_fork() -> None:
    global _key_prefix
    _key_prefix = _process_prefix()


os.register_at_fork(after_in_child=_after_fork)


def new_event_key() -> str:
    """A key no other event has: this process's random prefix and a number of its own (two
    processes share a prefix with odds of 2^-72)."""
    return f"{_key_prefix}{next(_key_count):x}"


@dataclass(frozen=True, slots=True)
class Event:
    """One event: ``type`` and its JSON ``data`` (which carries ``type`` and ``ts`` too).

    ``key`` tells this event from every other, whatever its data: the publisher stores it with
    the event in each topic's Stream, so that publishing the same ``Event`` again after an
    error (a retry) writes it only where it is missing (``publish.lua``). It is not part of
    the event's JSON, nor of its equality."""

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    key: str = field(default_factory=new_event_key, compare=False)

    def __post_init__(self) -> None:
        # A read-only view so that an event shared between publishers and tests cannot change.
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    @classmethod
    def create(cls, type: str, /, **fields: Any) -> Event:
        """An event whose data has ``type``, ``ts`` (now, unless given) and ``fields``."""
        if "type" in fields:
            raise ValueError("Event.create takes the type once, as its first argument")
        data: dict[str, Any] = {"type": type, "ts": iso_now()}
        data.update(fields)
        # Made as __init__ would, without its copy: data is this event's own dict already.
        event = object.__new__(cls)
        object.__setattr__(event, "type", type)
        object.__setattr__(event, "data", MappingProxyType(data))
        object.__setattr__(event, "key", new_event_key())
        return event

    def encode(self) -> bytes:
        """The data as one line of compact JSON, UTF-8 (JSON escapes every newline)."""
        # data is always the read-only view made in __post_init__: its copy() is a dict's copy,
        # several times cheaper than dict() of the view (which goes key by key).
        data = cast("MappingProxyType[str, Any]", self.data).copy()
        try:
            return orjson.dumps(data, default=_jsonable, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass  # the json module's turn: it writes what orjson refuses, or says why not
        try:
            return _ENCODER.encode(data).encode()
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError: a lone surrogate
            raise EventEncodingError(
                f"event {self.type!r} has data that is not JSON ({exc}); "
                "convert such values to str, numbers, lists or mappings before publishing"
            ) from exc
