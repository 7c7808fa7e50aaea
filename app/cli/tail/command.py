"""`lookout tail [OPERATION_ID]`: follow Lookout's event streams in the terminal.

With an operation id it follows `/v1/operations/{id}/events` to the terminal event and exits
0 when the operation completed, 1 when it failed or was cancelled. Without one it follows the
user's `/v1/events` until interrupted. A dropped connection is resumed with `Last-Event-ID`.
On a terminal: rich progress bars; otherwise one plain line per event on stdout.

This module is the command: its options, its exit status and its last words. Reading the
stream is `app.cli.tail.stream`; what events mean and how they look is `app.cli.tail.render`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.markup import escape

from app.cli.tail.render import BarView, LineView, exit_code_for, render_line, reset_snapshot
from app.cli.tail.stream import (
    TIMEOUT,
    SSEMessage,
    SSEParser,
    TailError,
    follow,
    reconnect_delay,
)
from app.settings import ConfigError

# The parsing, following and rendering names are re-exported: they were defined here first,
# and callers and tests import them from `app.cli.tail.command`.
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


class MissingAPIKey(ConfigError):
    """No API key was given (a ConfigError, so the CLI prints it as one line)."""


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
    view = BarView(console) if console.is_terminal else LineView()
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
    if isinstance(view, BarView) and outcome is not None:
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
