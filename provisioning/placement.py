"""Graphs over several provisioning servers: each new graph is placed on the server with the
most room, and everything later done to it goes to the server it was placed on.

- **Placement** (the first step of a provision that finds its graph unplaced): under one
  advisory lock shared by every instance, the graphs of each server are counted (those being
  placed included, so a burst spreads) and the open server (not drained) with the most room
  (``weight`` minus its graphs; ties go to the one listed first) is recorded on the resource.
  Servers this process saw down come last. The chosen server is probed (a connection and
  ``SELECT 1``); one that does not answer is marked down and the next is chosen, at once. Only
  then is the choice pinned (``resources.placed``), before the step's first connection, so a
  graph is never half-created on one server and continued on another: a provision pinned to a
  server that goes down afterwards waits for it (``operation.waiting``, the executor's retry
  window) and completes when it is back. When no server answers, the step fails as a
  transient error and the executor's retries place it again later.
- **Routing**: every other step, teardown, credentials, sessions and sizes go to the
  resource's recorded server. A resource never pinned has nothing anywhere: its teardown does
  nothing (a cancelled or failed provision is rolled back even while every server is down).
- **Health**: ``ServerHealth``, this process's view, fed by every connection a step or a probe
  makes. A server that failed is passed over for ``down_seconds``; then the next placement
  that prefers it probes it again. Nothing probes in the background: a server is contacted
  only for work (and a stopped instance that wakes up touches no server before its lease
  says it may).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final, TypeVar, cast

import asyncpg

from .backend import (
    ConnectionMeter,
    Credentials,
    OperationKind,
    ProvisionerBackend,
    Step,
    StepContext,
)
from .errors import DATABASE_ERRORS, NoServerAvailable, ServerNotConfigured
from .graph import GraphBackend, StorageMeter
from .operations import Connection
from .resources import (
    assign_server,
    graphs_by_server,
    name_legacy_graphs,
    pin_open_server,
    pin_server,
    resource_server,
)
from .servers import (
    ProvisioningServer,
    ServerHealth,
    ServerState,
    drained_servers,
    is_unreachable,
    probe,
    server_states,
)

__all__ = ["PLACEMENT_LOCK_ID", "PlacedGraphBackend"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Taken (transaction-scoped) around counting and recording a placement, on Lookout's database:
# two instances placing at once would both see the same counts and pick the same server.
PLACEMENT_LOCK_ID: Final = 0x10_0C_00_16
# Placed resources never move: remembered, up to this many, to spare a read per step.
_REMEMBERED = 10_000


class PlacedGraphBackend:
    """The graph backend of Lookout over ``servers``: ``(server, its own backend)`` pairs, the
    first one being where graphs made before servers were named live. ``pool`` is Lookout's
    database, where ``resources`` records each graph's server."""

    resource_type = "graph"
    id_prefix = "gr"

    def __init__(
        self,
        pool: asyncpg.Pool,
        servers: Sequence[tuple[ProvisioningServer, ProvisionerBackend]],
        *,
        health: ServerHealth | None = None,
        probe_timeout: float = 3.0,
        acquire_timeout: float = 5.0,
    ) -> None:
        if not servers:
            raise ValueError("PlacedGraphBackend needs at least one server")
        if any(b.resource_type != self.resource_type for _, b in servers):
            raise ValueError("PlacedGraphBackend places graphs: give it graph backends")
        self._pool = pool
        self._servers = tuple(s for s, _ in servers)
        self._backends: dict[str, ProvisionerBackend] = {s.name: b for s, b in servers}
        self.health = health or ServerHealth()
        self._probe_timeout = probe_timeout
        self._acquire_timeout = acquire_timeout
        self._placed: dict[str, str] = {}
        self._sizes: dict[str, dict[str, int]] = {}

    @property
    def first(self) -> ProvisioningServer:
        return self._servers[0]

    @property
    def server_backends(self) -> tuple[ProvisionerBackend, ...]:
        """The backend of each server, in the configured order (each gets its warm pool)."""
        return tuple(self._backends[s.name] for s in self._servers)

    def _backend_on(self, name: str) -> ProvisionerBackend:
        try:
            return self._backends[name]
        except KeyError:
            raise ServerNotConfigured(
                f"provisioning server {name} is not configured here (configured:"
                f" {', '.join(self._backends)}); give every instance the same servers"
            ) from None

    def _acquire(self) -> AbstractAsyncContextManager[Connection]:
        return cast(
            "AbstractAsyncContextManager[Connection]",
            self._pool.acquire(timeout=self._acquire_timeout),
        )

    # -- the backend ----------------------------------------------------------------------
    def steps(self, kind: OperationKind) -> Sequence[Step]:
        template = self._backends[self.first.name].steps(kind)
        return tuple(
            Step(
                step.name,
                step.message,
                functools.partial(self._run_step, kind, step.name),
                functools.partial(self._needed, kind, step.name),
            )
            for step in template
        )

    def _needed(self, kind: OperationKind, name: str, ctx: StepContext) -> bool:
        """As the resource's server's backend says, once the resource is placed (its later
        steps: the first one places it); a step is run when this process cannot tell."""
        server = self._placed.get(ctx.resource_id)
        if server is None:
            return True
        step = next(s for s in self._backend_on(server).steps(kind) if s.name == name)
        return step.needed is None or step.needed(ctx)

    async def _run_step(self, kind: OperationKind, name: str, ctx: StepContext) -> None:
        if kind == "provision":
            server = await self.place(ctx.resource_id)
        else:
            server, _ = await self._where(ctx.resource_id)
        steps = self._backend_on(server).steps(kind)
        step = next(s for s in steps if s.name == name)
        await self._on(server, step.run(ctx))

    async def teardown(self, resource_id: str) -> None:
        server, placed = await self._where(resource_id)
        if not placed:
            # Never pinned: nothing of it was created on any server.
            return
        await self._on(server, self._backend_on(server).teardown(resource_id))

    async def rotate_credentials(self, resource_id: str) -> Credentials:
        """The password is set on the graph's own server; the DSN names that server."""
        server, _ = await self._where(resource_id)
        return await self._on(server, self._backend_on(server).rotate_credentials(resource_id))

    async def open_connections(self, resource_id: str) -> int:
        server, _ = await self._where(resource_id)
        backend = self._backend_on(server)
        if not isinstance(backend, ConnectionMeter):
            raise TypeError(f"the backend of {server} cannot count sessions")
        return await self._on(server, backend.open_connections(resource_id))

    async def confine(self, graph_id: str, limits: Mapping[str, int]) -> None:
        """``GraphBackend.confine`` on the graph's server."""
        server, _ = await self._where(graph_id)
        backend = self._backend_on(server)
        if not isinstance(backend, GraphBackend):
            raise TypeError(f"the backend of {server} is not a GraphBackend")
        await self._on(server, backend.confine(graph_id, limits))

    async def storage_bytes(self) -> dict[str, int]:
        """Sizes of the graphs of every server; a server down keeps its last sizes."""
        sizes: dict[str, int] = {}
        for server in self._servers:
            backend = self._backends[server.name]
            if not isinstance(backend, StorageMeter):
                continue
            if not self.health.is_down(server.name):
                try:
                    self._sizes[server.name] = await self._on(server.name, backend.storage_bytes())
                except DATABASE_ERRORS as exc:
                    logger.warning("sizes on %s not measured (%s)", server, type(exc).__name__)
            sizes.update(self._sizes.get(server.name, {}))
        return sizes

    # -- where a resource is ----------------------------------------------------------------
    async def _where(self, resource_id: str) -> tuple[str, bool]:
        """The resource's server and whether it is placed there. A resource missing from the
        table (a graph made by hand, before Lookout recorded servers) is on the first one."""
        known = self._placed.get(resource_id)
        if known is not None:
            return known, True
        async with self._acquire() as conn:
            found = await resource_server(conn, resource_id)
        server, placed = found if found is not None else (None, True)
        name = server or self.first.name
        if placed:
            self._remember(resource_id, name)
        return name, placed

    def _remember(self, resource_id: str, server: str) -> None:
        if len(self._placed) >= _REMEMBERED:
            self._placed.clear()
        self._placed[resource_id] = server

    async def place(self, resource_id: str) -> str:
        """The server of ``resource_id``, chosen, probed and pinned now unless it was."""
        if len(self._servers) == 1 and resource_id not in self._placed:
            # Nothing to choose: probed (on the operation's kept admin connection), then
            # pinned in one statement unless drained (then as below). The lock and the count
            # of every graph (8 statements, a commit, placements one at a time: 34 ms of lock
            # wait each in a burst of 100) decide nothing here. Pinned only once the server
            # answered, as below: an instance cut off from it pins nothing, so another that
            # reaches the server (under its own name) can place the graph.
            await self._probe(self.first)
            async with self._acquire() as conn:
                pinned = await pin_open_server(conn, resource_id, self.first.name)
            if pinned is not None:
                self._remember(resource_id, pinned)
                return pinned
        server, placed = await self._where(resource_id)
        if placed:
            return server
        tried: set[str] = set()
        last: Exception | None = None
        while True:
            chosen = await self._choose(resource_id, tried)
            if chosen is None:
                # Every open server was tried in this attempt: the step fails as the last
                # one did (transient: the executor retries, then waits), and places again.
                assert last is not None
                raise last
            try:
                await self._probe(chosen)
            except Exception as exc:
                tried.add(chosen.name)
                last = exc
                logger.warning(
                    "provisioning server %s does not answer (%s); placing %s on another",
                    chosen,
                    type(exc).__name__,
                    resource_id,
                )
                continue
            async with self._acquire() as conn:
                # None: no such row (a graph driven by hand, outside the runner).
                pinned = await pin_server(conn, resource_id, chosen.name) or chosen.name
            self._remember(resource_id, pinned)
            logger.info("graph %s placed on %s", resource_id, pinned)
            return pinned

    async def _choose(self, resource_id: str, tried: set[str]) -> ProvisioningServer | None:
        """Records the best open server not ``tried`` for the resource; None when there is no
        such server left."""
        async with self._acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PLACEMENT_LOCK_ID)
            counts = await graphs_by_server(conn, self.first.name)
            drained = await drained_servers(conn)
            found = await resource_server(conn, resource_id)
            current = found[0] if found is not None else None
            open_ = [s for s in self._servers if s.name not in drained]
            if not open_:
                raise NoServerAvailable(
                    "every provisioning server is drained; undrain one (lookout servers"
                    " undrain) or add one"
                )
            left = [s for s in open_ if s.name not in tried]
            if not left:
                return None
            # Servers this process saw down come last, tried only when no other is left.
            candidates = [s for s in left if not self.health.is_down(s.name)] or left

            def room(server: ProvisioningServer) -> int:
                # Its own earlier choice is in the count already.
                held = counts.get(server.name, 0) - (1 if server.name == current else 0)
                return server.weight - held

            best = max(candidates, key=lambda s: (room(s), -self._servers.index(s)))
            await assign_server(conn, resource_id, best.name)
        if room(best) <= 0:
            logger.warning(
                "every open provisioning server holds its weight in graphs or more; %s takes"
                " %s anyway (add a server, or raise its lookout_weight)",
                best,
                resource_id,
            )
        return best

    # -- health -------------------------------------------------------------------------------
    async def _on(self, server: str, work: Awaitable[T]) -> T:
        """Awaits work done on ``server``, noting whether the server answered."""
        try:
            result = await work
        except Exception as exc:
            if is_unreachable(exc):
                self.health.mark_down(server)
            raise
        self.health.mark_up(server)
        return result

    async def _probe(self, server: ProvisioningServer) -> None:
        try:
            await probe(server, within=self._probe_timeout)
        except Exception:
            # Unreachable, or refusing the admin's login: either way it takes no graph now.
            self.health.mark_down(server.name)
            raise
        self.health.mark_up(server.name)

    async def name_older_graphs(self) -> int:
        """Records the first server on the graphs made before servers were named (once at
        start), so that reordering the list later does not move them; answers how many."""
        async with self._acquire() as conn:
            count = await name_legacy_graphs(conn, self.first.name)
        if count:
            logger.info("%d older graph(s) recorded on %s", count, self.first)
        return count

    async def states(self, conn: Connection) -> list[ServerState]:
        """Every server as this process sees it (``/metrics``)."""
        counts = await graphs_by_server(conn, self.first.name)
        up = {s.name: not self.health.is_down(s.name) for s in self._servers}
        return await server_states(conn, self._servers, counts, up)
