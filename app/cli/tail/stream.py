"""Following one of Lookout's SSE streams over HTTP, for `lookout tail`.

The wire side of the command: the `text/event-stream` parser, and `follow`, which yields
each event's (type, data) and resumes a dropped connection with `Last-Event-ID`, backing
off as the server's `retry:` and `Retry-After` ask. What the events mean and how they are
shown is `app.cli.tail.render`; the command itself is `app.cli.tail.command`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import httpx

__all__ = [
    "TIMEOUT",
    "SSEMessage",
    "SSEParser",
    "TailError",
    "follow",
    "reconnect_delay",
]

DEFAULT_RETRY_MS: Final = 3000
MAX_DELAY_SECONDS: Final = 30.0
MAX_FAILURES: Final = 10  # consecutive attempts without a stream before giving up
FIRST_FAILURES: Final = 3  # the same, before any stream was ever opened
# Longer than the server's keep-alive interval (15 s): a silent connection is a dead one.
TIMEOUT: Final = httpx.Timeout(10.0, read=45.0)


class TailError(Exception):
    """The stream cannot be followed; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class SSEMessage:
    event: str
    data: str
    id: str | None


class SSEParser:
    """The `text/event-stream` format (WHATWG HTML, "Parsing an event stream"), fed one
    line at a time without its line ending. `last_event_id` and `retry_ms` are kept across
    messages, as an EventSource keeps them across reconnections."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        self.retry_ms: int | None = None
        self._data: list[str] = []
        self._event = ""
        # An id counts once its message is complete: a message cut off by a dropped
        # connection must be asked for again.
        self._id = last_event_id or ""

    def feed(self, line: str) -> SSEMessage | None:
        """The message that a blank line completes, else None."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        self.last_event_id = self._id or None
        if not data:
            return None
        return SSEMessage(event or "message", "\n".join(data), self.last_event_id)


def reconnect_delay(
    failures: int, retry_ms: int | None, retry_after: float | None = None, jitter: float = 1.0
) -> float:
    """Seconds before attempt `failures` + 1: the server's `retry:` doubled per consecutive
    failure, capped, times `jitter`; never sooner than a `Retry-After`."""
    base = (retry_ms if retry_ms is not None else DEFAULT_RETRY_MS) / 1000
    delay = min(MAX_DELAY_SECONDS, base * 2.0 ** max(0, failures - 1)) * jitter
    return max(delay, retry_after or 0.0)


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


class _Retry(Exception):
    """A refusal worth trying again (429, 5xx), after `retry_after` seconds at least."""

    def __init__(self, reason: str, retry_after: float | None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def follow(
    client: httpx.Client,
    path: str,
    *,
    notice: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, data) of the stream at `path`, across reconnections, until the server
    answers 204 (nothing more will come) or the caller stops iterating."""
    parser = SSEParser()
    failures = 0
    opened = False
    while True:
        headers = {"Accept": "text/event-stream"}
        if parser.last_event_id:
            headers["Last-Event-ID"] = parser.last_event_id
        retry_after: float | None = None
        try:
            with client.stream("GET", path, headers=headers) as response:
                if response.status_code == 204:
                    return
                if response.status_code != 200:
                    response.read()
                    _refuse(path, response)
                failures, opened = 0, True
                for line in response.iter_lines():
                    message = parser.feed(line)
                    if message is not None:
                        yield message.event, _json(message.data)
            reason = "the server closed the stream"
        except httpx.TransportError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except _Retry as exc:
            reason, retry_after = str(exc), exc.retry_after
        failures += 1
        if failures >= (MAX_FAILURES if opened else FIRST_FAILURES):
            raise TailError(f"gave up on {client.base_url} after {failures} attempts: {reason}")
        # Jitter spreads the reconnections of many clients after a restart.
        jitter = random.uniform(0.9, 1.1)
        delay = reconnect_delay(failures, parser.retry_ms, retry_after, jitter)
        where = f" after event {parser.last_event_id}" if parser.last_event_id else ""
        notice(f"{reason}; resuming{where} in {delay:.1f} s")
        sleep(delay)


def _refuse(path: str, response: httpx.Response) -> None:
    status, message = response.status_code, _error_message(response)
    if status == 429 or status >= 500:
        wait = response.headers.get("Retry-After", "")
        raise _Retry(f"{path} answered {message}", float(wait) if wait.isdigit() else None)
    if status == 401:
        raise TailError(f"the API key was not accepted: {message}; check --api-key")
    if status == 404:
        raise TailError(f"{path} was not found: {message}; check the operation id")
    raise TailError(f"{path} answered {message}")


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}
