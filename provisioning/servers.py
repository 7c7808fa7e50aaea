"""The provisioning servers: which there are, which answer, which an operator drained.

A server is named by its DSN (``PROVISIONER_DATABASE_URL`` lists one or several, see
docs/CONFIGURATION.md): ``host:port`` as the DSN writes it, or ``?lookout_name=``. Its name is
what ``resources.server`` records and what an operator types (``lookout servers drain``), so it
must stay the same while the server holds graphs. ``?lookout_weight=N`` says how many graphs
the server is meant to hold; placement (``provisioning.placement``) gives a new graph to the
server with the most room left. Both parameters are Lookout's: they are taken out of the DSN
before anything connects with it.

Whether a server answers is each process's own view (``ServerHealth``: a failed connection
marks it down for a while, the next probe or placement checks again); whether it is drained
is shared by every instance, in the ``provisioning_servers`` table.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from .operations import Connection
from .pgadmin import admin_connection

__all__ = [
    "DEFAULT_WEIGHT",
    "ProvisioningServer",
    "ServerHealth",
    "ServerState",
    "drained_servers",
    "is_unreachable",
    "parse_servers",
    "probe",
    "server_states",
    "set_drained",
    "split_server_dsns",
]

# A server whose DSN names no weight is presumed to hold this many graphs; only the ratio
# matters while every server is below its weight.
DEFAULT_WEIGHT: Final = 1000
_PARAMETERS = frozenset({"lookout_weight", "lookout_name"})
# A list item starts where a comma is followed by a scheme: the commas of a multi-host DSN
# (postgresql://h1:5432,h2:5432/db, as libpq and asyncpg read it) stay inside their item.
_ITEM_START = re.compile(r",\s*(?=postgres(?:ql)?://)")


@dataclass(frozen=True, slots=True)
class ProvisioningServer:
    """One PostgreSQL server that receives customer databases."""

    name: str
    dsn: str  # what asyncpg connects with: Lookout's own parameters taken out
    weight: int = DEFAULT_WEIGHT

    @classmethod
    def parse(cls, dsn: str) -> ProvisioningServer:
        """Raises ``ValueError`` saying what is wrong (never quoting the password)."""
        parts = urlsplit(dsn.strip())
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must start with postgresql://")
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k.startswith("lookout_")}
        unknown = sorted(set(ours) - _PARAMETERS)
        if unknown:
            raise ValueError(
                f"has unknown parameter(s) {', '.join(unknown)}; Lookout reads"
                " lookout_weight and lookout_name"
            )
        weight = DEFAULT_WEIGHT
        if "lookout_weight" in ours:
            raw = ours["lookout_weight"]
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(
                    f"has lookout_weight={raw!r}: a whole number of graphs, at least 1 (to take"
                    " no new graphs, drain the server: lookout servers drain)"
                )
            weight = int(raw)
        name = ours.get("lookout_name") or _host_and_port(parts)
        if not name.strip():
            raise ValueError("has an empty lookout_name")
        rest = [(k, v) for k, v in query if not k.startswith("lookout_")]
        return cls(
            name=name.strip(),
            dsn=urlunsplit(parts._replace(query=urlencode(rest))),
            weight=weight,
        )

    def __str__(self) -> str:
        return self.name


def _host_and_port(parts: SplitResult) -> str:
    """``host:port`` of a DSN as libpq reads it (``?host=``/``?port=`` win over the netloc;
    a multi-host list is kept as written)."""
    query = dict(parse_qsl(parts.query))
    hosts = parts.netloc.rpartition("@")[2]
    if "host" in query:
        return f"{query['host']}:{query.get('port') or 5432}"
    if "," in hosts:
        return hosts
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number") from None
    host = parts.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{query.get('port') or port or 5432}"


def split_server_dsns(text: str) -> list[str]:
    """The DSNs of a comma-separated list (see ``_ITEM_START``); empty items are dropped."""
    return [item.strip() for item in _ITEM_START.split(text) if item.strip()]


def parse_servers(dsns: Iterable[str]) -> tuple[ProvisioningServer, ...]:
    """Raises ``ValueError`` naming the item (by position and server, never its password)."""
    servers: list[ProvisioningServer] = []
    for index, dsn in enumerate(dsns, start=1):
        try:
            server = ProvisioningServer.parse(dsn)
        except ValueError as exc:
            raise ValueError(f"server {index} ({_redacted(dsn)}) {exc}") from None
        if any(s.name == server.name for s in servers):
            raise ValueError(
                f"server {index} is named {server.name} like an earlier one; give one of them"
                " another ?lookout_name="
            )
        servers.append(server)
    return tuple(servers)


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn.strip())
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{hosts}", query=""))


# -- whether a server answers (this process's view) -----------------------------------------
# Errors that say the server (or the way to it) is not there, as opposed to a statement that
# failed on a server that answers.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


def is_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, _UNREACHABLE)


class ServerHealth:
    """Which servers answer, as this process last saw them: a server that failed to answer is
    ``down`` for ``down_seconds`` (it gets no new graphs meanwhile), unless a connection
    succeeds before. Nothing here blocks: probes are the caller's."""

    def __init__(self, *, down_seconds: float = 10.0) -> None:
        self.down_seconds = down_seconds
        self._down_until: dict[str, float] = {}

    def is_down(self, name: str) -> bool:
        return time.monotonic() < self._down_until.get(name, 0.0)

    def mark_down(self, name: str) -> None:
        self._down_until[name] = time.monotonic() + self.down_seconds

    def mark_up(self, name: str) -> None:
        self._down_until.pop(name, None)


async def probe(server: ProvisioningServer, *, within: float) -> None:
    """Connects and says ``SELECT 1``: raises what a step would meet when the server is away
    (``TimeoutError`` after ``within`` seconds: a server that accepts and says nothing)."""
    async with admin_connection(server.dsn, tag="lookout:probe", connect_timeout=within) as conn:
        await conn.fetchval("SELECT 1", timeout=within)


# -- what the operators decide and see (shared by every instance) ---------------------------
async def set_drained(conn: Connection, name: str, drained: bool) -> None:
    """A drained server gets no new graphs; those it holds stay and work."""
    await conn.execute(
        "INSERT INTO provisioning_servers AS s (name, drained_at)"
        " VALUES ($1, CASE WHEN $2 THEN now() END)"
        " ON CONFLICT (name) DO UPDATE SET updated_at = now(), drained_at = CASE"
        " WHEN $2 THEN coalesce(s.drained_at, now()) END",
        name,
        drained,
    )


async def drained_servers(conn: Connection) -> frozenset[str]:
    rows = await conn.fetch("SELECT name FROM provisioning_servers WHERE drained_at IS NOT NULL")
    return frozenset(r["name"] for r in rows)


@dataclass(frozen=True, slots=True)
class ServerState:
    """One server as an operator looks at it (`lookout servers list`, ``/metrics``)."""

    name: str
    weight: int | None  # None: a server graphs are recorded on, missing from the configuration
    graphs: int
    drained: bool
    up: bool | None = None  # None: not known here


async def server_states(
    conn: Connection,
    servers: Sequence[ProvisioningServer],
    graphs: Mapping[str, int],
    up: Mapping[str, bool] | None = None,
) -> list[ServerState]:
    """Every configured server, then every other server that ``graphs`` (the count of graphs
    by server, ``resources.graphs_by_server``) names: graphs left on a server taken out of the
    configuration."""
    drained = await drained_servers(conn)
    up = up or {}
    states = [
        ServerState(s.name, s.weight, graphs.get(s.name, 0), s.name in drained, up.get(s.name))
        for s in servers
    ]
    known = {s.name for s in servers}
    states += [
        ServerState(name, None, count, name in drained)
        for name, count in sorted(graphs.items())
        if name not in known
    ]
    return states
