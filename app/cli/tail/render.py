"""What Lookout's events mean to `lookout tail`, and how it shows them.

Pure functions read an event's (type, data): `render_line` gives its one-line form,
`exit_code_for` whether it ends an operation, `reset_snapshot` what a `stream.reset` says is
current. The two views print events: `LineView` one plain line each (pipes, files, tests),
`BarView` rich progress bars on a terminal. Reading the stream is `app.cli.tail.stream`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn
from rich.text import Text

__all__ = [
    "BarView",
    "LineView",
    "exit_code_for",
    "render_line",
    "reset_snapshot",
]

TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
STYLES: Final = MappingProxyType(
    {
        "completed": "green",
        "failed": "red",
        "cancelled": "yellow",
        "reset": "yellow",
        "waiting": "yellow",
    }
)


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
            ends = sub.get("cancel_at") or sub.get("current_period_end") or "?"
            parts.append(f"cancels on {ends}")
        if sub.get("operation_id"):
            parts.append(f"operation {sub['operation_id']}")
        sub_id = sub.get("id") or data.get("subscription_id", "?")
        details = " · ".join(part for part in parts if part)
        return f"{sub_id} {sub.get('status', '?'):<9} {details}".rstrip()
    if event == "invoice.updated":
        invoice = data.get("invoice") or {}
        amount = invoice.get("amount_paid") if invoice.get("status") == "paid" else None
        if amount is None:
            amount = invoice.get("amount_due")
        money = (
            f"{amount / 100:.2f} {str(invoice.get('currency') or '').upper()}"
            if isinstance(amount, int)
            else ""
        )
        number = invoice.get("number") or invoice.get("id") or "?"
        subject = data.get("subscription_id", "?")
        return f"{subject} invoice   {number} {invoice.get('status') or '?'} {money}".rstrip()
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


class LineView:
    """One plain line per event on stdout: for pipes, files and tests."""

    live: contextlib.AbstractContextManager[object] = contextlib.nullcontext()

    def show(self, event: str, data: Mapping[str, Any]) -> None:
        print(render_line(event, data), flush=True)


class BarView(LineView):
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
