"""`lookout webhooks replay (EVENT_ID | --failed)`: put inbox events back in line.

Every running instance sweeps the inbox every few seconds and picks them up then."""

from __future__ import annotations

from app.billing.inbox import requeue_events
from app.db import create_pool
from app.settings import Settings

__all__ = ["UnknownEvent", "replay"]


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
