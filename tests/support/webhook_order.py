"""How the test suite's Stripe emulators deliver webhooks: late and out of order by default.

Stripe promises no order and no timing, so every emulator of the suite shuffles its deliveries
with a random seed, printed (pytest shows it with a failing test's output) so that a failure
can be replayed: `LOOKOUT_TEST_WEBHOOK_SEED=<seed> pytest ...`. `LOOKOUT_TEST_WEBHOOK_SEED=off`
delivers in creation order, as the emulator does outside the tests.
"""

from __future__ import annotations

import os
import secrets
from typing import TypedDict

__all__ = ["MAX_DELAY", "webhook_order"]

# Long enough to put a checkout's seven events in any order, short enough for a quick suite.
MAX_DELAY = 0.3


class WebhookOrder(TypedDict):
    webhook_shuffle_seed: int | None
    webhook_max_delay: float


def webhook_order(shuffle: bool | None = None) -> WebhookOrder:
    """`create_emulator` keywords: shuffled (the default, unless `shuffle` is False or the
    environment says `off`) with the seed of `LOOKOUT_TEST_WEBHOOK_SEED` or a new one."""
    chosen = os.environ.get("LOOKOUT_TEST_WEBHOOK_SEED", "").strip()
    if shuffle is False or (shuffle is None and chosen == "off"):
        return {"webhook_shuffle_seed": None, "webhook_max_delay": 0.0}
    seed = int(chosen) if chosen.isdigit() else secrets.randbelow(2**31)
    print(
        f"Stripe emulator: webhooks delivered out of order, seed {seed}"
        f" (replay with LOOKOUT_TEST_WEBHOOK_SEED={seed})"
    )
    return {"webhook_shuffle_seed": seed, "webhook_max_delay": MAX_DELAY}
