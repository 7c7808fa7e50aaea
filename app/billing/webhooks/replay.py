"""`lookout webhooks replay (EVENT_ID | --failed)`: put inbox events back in line, and
`lookout webhooks list [--pending | --failing]`: what is in it.

Every running instance sweeps the inbox every few seconds and picks replayed events up then."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from app.billing.webhooks.inbox import StoredEvent, list_events, requeue_events
from app.db import create_pool
from app.settings import Settings

__all__ = ["UnknownEvent", "describe", "list_webhooks", "replay"]


class UnknownEvent(LookupError):
    """No stored webhook event has this id; `lookout webhooks replay --failed` takes them all."""


async def replay(settings: Settings, *, event_id: str | None, failed: bool) -> int:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            count = await requeue_events(conn, event_id=event_id, failed=failed)
    finally:
        await pool.close()
    if event_id is not None and count == 0:
        raise UnknownEvent(f"there is no webhook event {event_id} in the inbox")
    return count


async def list_webhooks(
    settings: Settings, which: Literal["pending", "failing", "all"], *, limit: int
) -> list[StoredEvent]:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            return await list_events(conn, which, limit=limit)
    finally:
        await pool.close()


def describe(event: StoredEvent) -> str:
    """One line: id, type, status, attempts, received and next attempt times, last error."""
    settled = event.status in ("processed", "failed")
    parts = [
        event.id,
        event.type,
        event.status,
        f"attempts={event.attempts}",
        f"received={_time(event.received_at)}",
        f"next={'-' if settled else _time(event.next_attempt_at)}",
    ]
    if event.last_error is not None:
        error = " ".join(event.last_error.split())  # one line, whatever the message holds
        kind = f"({event.last_error_kind})" if event.last_error_kind else " before replay"
        parts.append(f"error{kind}={error[:300]}")
    return "  ".join(parts)


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
