"""An inbox worker in a process of its own, for the takeover test: it claims the stored event,
starts handling it, prints ``HOLDING <event id>`` and never finishes, so that the test can
SIGKILL it there.

    python child_inbox.py DATABASE_URL
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import anyio
import asyncpg

from app.billing.webhooks.inbox import Batch, InboxEvent, WebhookInbox
from app.db import Connection


class Holding:
    async def __call__(self, event: InboxEvent) -> None:
        print(f"HOLDING {event.id}", flush=True)
        await anyio.sleep_forever()

    def batchable(self, event: InboxEvent) -> bool:
        return False

    async def handle_many(self, conn: Connection, events: Sequence[InboxEvent]) -> Batch:
        return Batch()


async def main(argv: list[str]) -> None:
    (database_url,) = argv
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await WebhookInbox(pool, Holding()).run()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
