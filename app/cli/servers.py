"""`lookout servers (list | drain NAME | undrain NAME)`: the provisioning servers, for an operator.

The servers are those of PROVISIONER_DATABASE_URL (else the server of DATABASE_URL); whether
one is drained lives in Lookout's database, so every instance follows a drain at its next
placement, without a restart.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from app.db import Connection, create_pool, migrate
from app.settings import Settings
from provisioning import ResourceRecord, ServerState
from provisioning.resources import graphs_by_server, graphs_on_server
from provisioning.servers import ProvisioningServer, probe, server_states, set_drained

__all__ = ["Listed", "UnknownServer", "describe", "drain", "list_servers", "run"]

T = TypeVar("T")

PROBE_SECONDS = 3.0


class UnknownServer(Exception):
    """The name is not one of the configured servers; the message lists them."""


@dataclass(frozen=True, slots=True)
class Listed:
    state: ServerState
    graphs: list[ResourceRecord]  # a drained (or unconfigured) server's, else empty


async def _answers(servers: tuple[ProvisioningServer, ...]) -> dict[str, bool]:
    answered: dict[str, bool] = {}

    async def one(server: ProvisioningServer) -> None:
        try:
            await probe(server, within=PROBE_SECONDS)
        except Exception:
            answered[server.name] = False
        else:
            answered[server.name] = True

    async with anyio.create_task_group() as tg:
        for server in servers:
            tg.start_soon(one, server)
    return answered


async def _on_database(settings: Settings, work: Callable[[Connection], Awaitable[T]]) -> T:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            return await work(conn)
    finally:
        await pool.close()


async def list_servers(settings: Settings) -> list[Listed]:
    servers = settings.provisioning_servers
    first = servers[0].name
    up = await _answers(servers)

    async def work(conn: Connection) -> list[Listed]:
        counts = await graphs_by_server(conn, first)
        listed = []
        for state in await server_states(conn, servers, counts, up):
            shown = state.drained or state.weight is None
            graphs = await graphs_on_server(conn, state.name, first) if shown else []
            listed.append(Listed(state, graphs))
        return listed

    return await _on_database(settings, work)


def describe(listed: Listed) -> list[str]:
    """One line for the server, then one per graph it lists."""
    state = listed.state
    if state.weight is None:
        condition = "not-configured"
    else:
        condition = {True: "up", False: "down", None: "unknown"}[state.up]
        if state.drained:
            condition = f"drained,{condition}"
    weight = "-" if state.weight is None else str(state.weight)
    lines = [f"{state.name}  {condition}  graphs={state.graphs}  weight={weight}"]
    lines += [
        f"  {g.id}  {g.status}  {g.subject_id}  user={g.user_id}"
        f"  created={g.created_at.isoformat(timespec='seconds')}"
        for g in listed.graphs
    ]
    return lines


async def drain(settings: Settings, name: str, drained: bool) -> int:
    """Drains (or undrains) the configured server ``name``; answers how many graphs it holds."""
    servers = settings.provisioning_servers
    if name not in {s.name for s in servers}:
        raise UnknownServer(
            f"no provisioning server is named {name}; the servers are"
            f" {', '.join(s.name for s in servers)} (`lookout servers list`)"
        )

    async def work(conn: Connection) -> int:
        await set_drained(conn, name, drained)
        return (await graphs_by_server(conn, servers[0].name)).get(name, 0)

    return await _on_database(settings, work)


def run(settings: Settings, command: str, name: str | None) -> None:
    """``lookout servers <command> [name]``; raises ``UnknownServer``."""
    if command == "list":
        listed = asyncio.run(list_servers(settings))
        for item in listed:
            for line in describe(item):
                print(line)
        print(f"{len(listed)} server(s)", file=sys.stderr)
        return
    assert name is not None
    held = asyncio.run(drain(settings, name, command == "drain"))
    if command == "drain":
        print(
            f"drained {name}: no instance gives it a new graph from now on; its {held}"
            " graph(s) stay and work (`lookout servers list` shows them)",
            file=sys.stderr,
        )
    else:
        print(f"{name} takes new graphs again", file=sys.stderr)
