"""`lookout tail [OPERATION_ID]`: follow Lookout's event streams in the terminal.

With an operation id it follows `/v1/operations/{id}/events` to the terminal event and exits
0 when the operation completed, 1 when it failed or was cancelled. Without one it follows the
user's `/v1/events` until interrupted. A dropped connection is resumed with `Last-Event-ID`.
On a terminal: rich progress bars; otherwise one plain line per event on stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn
from rich.text import Text

from app.settings import ConfigError

__all__ = [
    "MissingAPIKey",
    "SSEMessage",
    "SSEParser",
    "TailError",
    "exit_code_for",
    "follow",
    "reconnect_delay",
    "render_line",
    "reset_snapshot",
    "run_tail",
]

DEFAULT_URL: Final = "http://127.0.0.1:8000"
DEFAULT_RETRY_MS: Final = 3000
MAX_DELAY_SECONDS: Final = 30.0
MAX_FAILURES: Final = 10  # consecutive attempts without a stream before giving up
FIRST_FAILURES: Final = 3  # the same, before any stream was ever opened
TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
STYLES: Final = MappingProxyType(
    {"completed": "green", "failed": "red", "cancelled": "yellow", "reset": "yellow"}
)
# Longer than the server's keep-alive interval (15 s): a silent connection is a dead one.
TIMEOUT: Final = httpx.Timeout(10.0, read=45.0)


class MissingAPIKey(ConfigError):
    """No API key was given (a ConfigError, so the CLI prints it as one line)."""


class TailError(Exception):
    """The stream cannot be followed; the message says why and what to do."""


# ---- pure parts: parsing and rendering ---------------------------------------------------


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


def reset_snapshot(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """What a `stream.reset` says is current: `snapshot.operation` on an operation's stream,
    `snapshot.subscriptions` on the user's."""
    snapshot = data.get("snapshot") or {}
    return (snapshot.get("operation") or {}) if "operation" in snapshot else snapshot


def exit_code_for(event: str, data: Mapping[str, Any]) -> int | None:
    """0 or 1 once an operation is over, None while it goes on."""
    if event == "stream.reset":
        status = reset_snapshot(data).get("status")
        return None if status not in TERMINAL_STATUSES else int(status != "completed")
    if event in ("operation.completed", "operation.failed", "operation.cancelled"):
        return int(event != "operation.completed")
    return None


def _percent(value: object) -> str:
    return f"{int(value):>3d}%" if isinstance(value, int | float) else "   -"


def render_line(event: str, data: Mapping[str, Any]) -> str:
    """One line for one event, as printed when stdout is not a terminal."""
    if event.startswith("operation."):
        what = event.removeprefix("operation.")
        if what == "failed":
            text = data.get("error") or data.get("message") or "the operation failed"
        else:
            text = data.get("message") or data.get("step") or ""
        line = f"{data.get('operation_id', '?')} {what:<9} {_percent(data.get('progress'))} {text}"
        return line.rstrip()
    if event == "subscription.updated":
        sub = data.get("subscription") or {}
        parts = [str(sub.get("plan_display_name") or sub.get("plan") or "")]
        if sub.get("cancel_at_period_end"):
            parts.append(f"cancels at period end ({sub.get('current_period_end') or '?'})")
        if sub.get("operation_id"):
            parts.append(f"operation {sub['operation_id']}")
        sub_id = sub.get("id") or data.get("subscription_id", "?")
        details = " · ".join(part for part in parts if part)
        return f"{sub_id} {sub.get('status', '?'):<9} {details}".rstrip()
    if event == "stream.reset":
        snap = reset_snapshot(data)
        subject = data.get("operation_id") or data.get("user_id") or "stream"
        if isinstance(snap.get("subscriptions"), list):
            state = f"{len(snap['subscriptions'])} subscription(s) now"
        elif snap.get("status"):
            state = f"now {snap['status']} {_percent(snap.get('progress')).strip()}"
        else:
            state = ""
        return f"{subject} reset     history no longer kept; {state}".rstrip("; ")
    return f"{event} {json.dumps(dict(data), separators=(',', ':'))}"


def reconnect_delay(
    failures: int, retry_ms: int | None, retry_after: float | None = None, jitter: float = 1.0
) -> float:
    """Seconds before attempt `failures` + 1: the server's `retry:` doubled per consecutive
    failure, capped, times `jitter`; never sooner than a `Retry-After`."""
    base = (retry_ms if retry_ms is not None else DEFAULT_RETRY_MS) / 1000
    delay = min(MAX_DELAY_SECONDS, base * 2.0 ** max(0, failures - 1)) * jitter
    return max(delay, retry_after or 0.0)


# ---- I/O ----------------------------------------------------------------------------------


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


class _Lines:
    """One plain line per event on stdout: for pipes, files and tests."""

    live: contextlib.AbstractContextManager[object] = contextlib.nullcontext()

    def show(self, event: str, data: Mapping[str, Any]) -> None:
        print(render_line(event, data), flush=True)


class _Bars(_Lines):
    """Rich progress bars, one per operation, with each event printed above them."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[dim]{task.fields[op]}"),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}
        self.live = self.progress  # shows the bars while it is entered

    def show(self, event: str, data: Mapping[str, Any]) -> None:
        kind = event.rpartition(".")[2]
        self.progress.console.print(Text(render_line(event, data), style=STYLES.get(kind, "")))
        op = data.get("operation_id")
        if not isinstance(op, str) or not event.startswith(("operation.", "stream.reset")):
            return
        values = reset_snapshot(data) if event == "stream.reset" else data
        task = self.tasks.get(op)
        if task is None:
            task = self.tasks[op] = self.progress.add_task("", total=100, op=op)
        progress = values.get("progress")
        description = escape(str(values.get("message") or values.get("step") or ""))
        if isinstance(progress, int | float):
            self.progress.update(task, completed=progress, description=description)
        if exit_code_for(event, data) is not None:
            self.progress.update(task, description=f"[bold]{kind}[/] {description}")
            self.progress.stop_task(task)


def run_tail(operation_id: str | None, *, base_url: str | None, api_key: str | None) -> None:
    """Follow one operation to its end (exit status 1 unless it completed), or all events."""
    key = api_key or os.environ.get("LOOKOUT_API_KEY")
    if not key:
        raise MissingAPIKey(
            "no API key: pass --api-key or set LOOKOUT_API_KEY "
            "(`lookout users create EMAIL` prints one; `lookout demo` prints the demo key)"
        )
    url = (base_url or os.environ.get("LOOKOUT_PUBLIC_URL") or DEFAULT_URL).rstrip("/")
    # httpx logs every request at INFO, which would interleave with the events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    path = f"/v1/operations/{quote(operation_id, safe='')}/events" if operation_id else "/v1/events"
    console = Console()
    view = _Bars(console) if console.is_terminal else _Lines()
    headers = {"Authorization": f"Bearer {key}", "User-Agent": "lookout-tail"}
    outcome: int | None = None
    last = ""
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT) as client, view.live:
            for event, data in follow(client, path, notice=_notice):
                view.show(event, data)
                last = event
                outcome = exit_code_for(event, data) if operation_id else None
                if outcome is not None:
                    break
            else:
                if operation_id:  # 204: the end was sent before; the snapshot tells it
                    outcome = _final_outcome(client, operation_id)
    except TailError as exc:
        print(f"lookout: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(view, _Bars) and outcome is not None:
        failed = last.rpartition(".")[2] if last.startswith("operation.") else "did not complete"
        verdict = "[green]✓ completed" if outcome == 0 else f"[red]✗ {failed}"
        console.print(f"[bold]{verdict}[/] {escape(operation_id or '')}")
    if outcome:
        raise SystemExit(outcome)


def _notice(text: str) -> None:
    print(f"lookout tail: {text}", file=sys.stderr, flush=True)


def _final_outcome(client: httpx.Client, operation_id: str) -> int:
    response = client.get(f"/v1/operations/{quote(operation_id, safe='')}")
    status = response.json().get("status") if response.status_code == 200 else None
    print(f"{operation_id} {status or 'unknown'}", flush=True)
    return 0 if status == "completed" else 1
