"""`lookout demo`: the service, a local Stripe emulator and a demo user, on one port."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace

from starlette.routing import Mount

from app.db import create_pool
from app.settings import Settings
from app.users import create_api_key, create_user, get_user_by_email, user_for_api_key

__all__ = ["EMULATOR_STATE_FILE", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_EMAIL = "demo@lookout.local"
# In LOOKOUT_DATA_DIR: the emulator's customers, subscriptions and events, across restarts.
EMULATOR_STATE_FILE = "stripe_emulator.pickle"


async def demo_api_key(settings: Settings) -> str:
    """The demo user's key, kept in the data dir so that a restart prints the same one."""
    assert settings.database_url is not None
    key_file = settings.data_dir / "demo_api_key"
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            if key_file.exists():
                key = key_file.read_text().strip()
                if await user_for_api_key(conn, key) is not None:
                    return key
            async with conn.transaction():
                user = await get_user_by_email(conn, DEMO_EMAIL) or await create_user(
                    conn, DEMO_EMAIL
                )
                key = await create_api_key(conn, user.id)
    finally:
        await pool.close()
    key_file.write_text(key)
    key_file.chmod(0o600)
    return key


EMULATOR_MOUNT = "/stripe"


def _url_host(host: str) -> str:
    """Where this machine reaches a server bound to `host` (any address: loopback)."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def run_demo(settings: Settings, *, host: str, port: int, verbose: bool = False) -> None:
    """The Stripe emulator is mounted in the same app, so the demo needs one port only; the
    SDK calls it through STRIPE_API_BASE and it calls the webhook like Stripe would. Its state
    is saved in the data dir after every change, so a restart keeps what Lookout remembers."""
    from app.application import create_app
    from app.demo.stripe_emulator import create_emulator
    from app.demo.stripe_emulator.persistence import StateFile, persist_after_changes
    from app.server import run_server

    base = f"http://{_url_host(host)}:{port}"
    settings = replace(
        settings,
        public_url=base,
        stripe_api_base=base + EMULATOR_MOUNT,
        # The emulator delivers its webhooks to 127.0.0.1, whatever names the operator added
        # (e.g. the machine's address, for `--host 0.0.0.0`).
        allowed_hosts_given=(
            (*settings.allowed_hosts_given, "127.0.0.1") if settings.allowed_hosts_given else ()
        ),
    )
    emulator = create_emulator(
        webhook_url=f"{base}/v1/webhooks/stripe",
        webhook_secret=settings.stripe_webhook_secrets[0],
        public_url=base + EMULATOR_MOUNT,
        api_key=settings.stripe_api_key,
        control_key=settings.stripe_api_key,
    )
    found = emulator.state.emulator
    store = StateFile(settings.data_dir / EMULATOR_STATE_FILE, found.state, found.webhooks)
    if store.load():
        logger.info("the Stripe emulator's state was restored from %s", store.path)
    app = create_app(
        settings,
        extra_routes=[Mount(EMULATOR_MOUNT, persist_after_changes(emulator, store))],
    )
    key = asyncio.run(demo_api_key(settings))
    print(f"Dashboard: {base}/", flush=True)
    print(f"API key: {key}", flush=True)
    print(
        f"The key is kept in {settings.data_dir / 'demo_api_key'}. Press Ctrl-C to stop.",
        file=sys.stderr,
        flush=True,
    )
    try:
        run_server(
            settings,
            host=host,
            port=port,
            app=app,
            log_level="info" if verbose else "warning",
        )
    finally:
        store.save()
