"""Faults on a seeded random schedule, and the health watch that times each recovery.

Every kind of fault is injected for real: SIGKILL or SIGSTOP of a `lookout serve`, a redis-server
killed and restarted on its own data, `CLIENT KILL` of every client of that Redis (the soak's
own server: only Lookout and the soak use it), `pg_terminate_backend` restricted to the chaos
database, and the fault proxies refusing, stalling or slowing the connections to PostgreSQL,
Redis, the provisioning server and the Stripe API.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench.chaos.cluster import Instance, RedisServer, with_database
from bench.chaos.proxy import FaultProxy

__all__ = ["KINDS", "FaultRecord", "Faults", "HealthWatch"]

KINDS = (
    "instance SIGKILL",
    "instance SIGSTOP past lease",
    "redis restart",
    "redis CLIENT KILL",
    "postgres backends terminated",
    "provisioner unreachable",
    "stripe 500s and timeouts",
    "postgres latency",
)
_ONCE = frozenset({"redis CLIENT KILL"})


@dataclass
class FaultRecord:
    kind: str
    target: str
    started: float  # time.monotonic()
    lifted: float | None = None
    healthy_at: float | None = None
    detail: str = ""
    wall_ms: int = 0  # when it was injected, on the clock of Redis Stream ids
    in_flight: tuple[str, ...] = ()  # operations pending or running when an instance was killed

    @property
    def recovery(self) -> float | None:
        if self.lifted is None or self.healthy_at is None:
            return None
        return self.healthy_at - self.lifted


@dataclass
class Faults:
    rng: random.Random
    instances: Sequence[Instance]
    redis: RedisServer
    postgres_proxy: FaultProxy
    redis_proxy: FaultProxy
    provisioner_proxy: FaultProxy
    stripe_proxy: FaultProxy
    admin_url: str  # PostgreSQL directly, for pg_terminate_backend
    database: str  # the chaos database: the only one whose backends are terminated
    emulator_url: str
    kinds: Sequence[str] = KINDS
    records: list[FaultRecord] = field(default_factory=list)
    _busy: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def active(self) -> int:
        return sum(1 for r in self.records if r.lifted is None)

    async def run(self, window: float, first_after: float = 5.0, overrun: float = 120.0) -> None:
        """Starts faults at random moments during `window` seconds (each may outlast it),
        then waits until every one is lifted.

        Every kind is injected once first, in a random order, even past the window (by
        `overrun` seconds at most): a fault whose target is busy with another one gives way
        to the next kind instead of being pushed back past the end (a 60 s soak once ended
        with no Redis restart at all). Then random kinds until the window is over."""
        loop = asyncio.get_running_loop()
        end = loop.time() + window
        first = list(self.kinds)
        self.rng.shuffle(first)
        order: list[str] = []
        # Gaps sized so that a short soak still sees every kind once, overlapping at times.
        mean_gap = min(12.0, max(3.0, (window - first_after) / (len(self.kinds) + 1)))
        await asyncio.sleep(first_after)
        while first or loop.time() < end:
            if first and loop.time() >= end + overrun:
                break  # the targets stayed busy: the soak reports the kinds never injected
            if not first and not order:
                order = [k for k in self.kinds if k not in _ONCE or not self._done(k)]
                if not order:
                    break
                self.rng.shuffle(order)
            pending = first or order
            chosen = self._next(pending)
            if chosen is None:  # every target is busy with another fault: try again soon
                await asyncio.sleep(1.0)
                continue
            kind, target = chosen
            task = asyncio.ensure_future(self._inject(kind, target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * mean_gap)
        await asyncio.gather(*self._tasks)

    def _next(self, pending: list[str]) -> tuple[str, str] | None:
        """Takes the last kind of `pending` whose target is free, with that target."""
        for i in range(len(pending) - 1, -1, -1):
            target = self._target(pending[i])
            if target is not None:
                return pending.pop(i), target
        return None

    def _done(self, kind: str) -> bool:
        return any(r.kind == kind for r in self.records)

    def _target(self, kind: str) -> str | None:
        if kind.startswith("instance"):
            # Only an instance that is up: one stalled in its start-up is another story.
            free = [
                i.name
                for i in self.instances
                if i.name not in self._busy and i.running() and i.ready and not i.stopped
            ]
            # Never all instances at once: one must be left to take the work over.
            if len(free) < 2 and len(self.instances) - len(free) >= 1:
                return None
            return self.rng.choice(free) if free else None
        target = {
            "redis restart": "redis",
            "redis CLIENT KILL": "redis",
            "postgres backends terminated": "postgres",
            "postgres latency": "postgres",
            "provisioner unreachable": "provisioner",
            "stripe 500s and timeouts": "stripe",
        }[kind]
        return None if target in self._busy else target

    async def _inject(self, kind: str, target: str) -> None:
        self._busy.add(target)
        record = FaultRecord(kind, target, time.monotonic())
        self.records.append(record)
        try:
            actions: dict[str, Callable[[FaultRecord], Awaitable[None]]] = {
                "instance SIGKILL": self._kill,
                "instance SIGSTOP past lease": self._stop,
                "redis restart": self._redis_restart,
                "redis CLIENT KILL": self._client_kill,
                "postgres backends terminated": self._terminate,
                "postgres latency": self._latency,
                "provisioner unreachable": self._provisioner,
                "stripe 500s and timeouts": self._stripe,
            }
            await actions[kind](record)
        except (OSError, asyncpg.PostgresError, RedisError, httpx.HTTPError, RuntimeError) as exc:
            record.detail += f" (not fully injected: {type(exc).__name__}: {exc})"
        finally:
            record.lifted = time.monotonic()
            self._busy.discard(target)

    def _instance(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    async def _kill(self, record: FaultRecord) -> None:
        instance = self._instance(record.target)
        try:  # best effort: the kill happens whatever the database says
            conn = await asyncpg.connect(with_database(self.admin_url, self.database), timeout=5)
            try:
                rows = await conn.fetch(
                    "SELECT id FROM operations WHERE status IN ('pending', 'running')"
                )
                record.in_flight = tuple(r["id"] for r in rows)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            record.detail = "in-flight operations unknown; "
        record.wall_ms = int(time.time() * 1000)
        instance.kill()
        down = self.rng.uniform(0.5, 3.0)
        record.detail += f"down {down:.1f} s, {len(record.in_flight)} operations in flight"
        await asyncio.sleep(down)
        instance.start()

    async def _stop(self, record: FaultRecord) -> None:
        instance = self._instance(record.target)
        instance.pause()
        stopped = self.rng.uniform(16.0, 22.0)  # past the 15 s lease
        record.detail = f"stopped {stopped:.1f} s"
        try:
            await asyncio.sleep(stopped)
        finally:
            instance.resume()

    async def _redis_restart(self, record: FaultRecord) -> None:
        self.redis.kill()
        down = self.rng.uniform(1.0, 5.0)
        record.detail = f"down {down:.1f} s"
        await asyncio.sleep(down)
        await asyncio.to_thread(self.redis.start)

    async def _client_kill(self, record: FaultRecord) -> None:
        client = Redis(port=self.redis.port, socket_timeout=5)
        try:
            killed = 0
            for kind in ("normal", "pubsub"):
                with contextlib.suppress(RedisError):
                    killed += int(await client.client_kill_filter(_type=kind))
            record.detail = f"{killed} connections killed"
        finally:
            await client.aclose()

    async def _terminate(self, record: FaultRecord) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                self.database,
            )
            record.detail = f"{killed} backends terminated"
        finally:
            await conn.close()

    async def _latency(self, record: FaultRecord) -> None:
        seconds, added = self.rng.uniform(10.0, 20.0), self.rng.uniform(0.1, 0.4)
        record.detail = f"+{added * 1000:.0f} ms per chunk for {seconds:.0f} s"
        self.postgres_proxy.latency = added
        try:
            await asyncio.sleep(seconds)
        finally:
            self.postgres_proxy.latency = 0.0

    async def _provisioner(self, record: FaultRecord) -> None:
        seconds = self.rng.uniform(20.0, 60.0)
        record.detail = f"refused {seconds:.0f} s"
        await self.provisioner_proxy.refuse()
        try:
            await asyncio.sleep(seconds)
        finally:
            await self.provisioner_proxy.accept()

    async def _stripe(self, record: FaultRecord) -> None:
        """15 s of 500s from Stripe's API, then 15 s of connections that never answer."""
        record.detail = "500s 15 s, then stalled 15 s"
        async with httpx.AsyncClient(base_url=self.emulator_url, timeout=10) as control:
            await control.post(
                "/_emulator/faults", json={"path": "/v1/", "status": 500, "count": 1_000_000}
            )
            try:
                await asyncio.sleep(15.0)
            finally:
                await control.delete("/_emulator/faults")
        self.stripe_proxy.stall()
        self.stripe_proxy.drop_all()
        try:
            await asyncio.sleep(15.0)
        finally:
            self.stripe_proxy.unstall()


@dataclass
class HealthWatch:
    """Samples the whole system twice a second: every instance's /readyz answers 200 and an
    API call through the load balancer (which reads the database) answers 200. The first such
    moment after a fault was lifted is its recovery."""

    instances: Sequence[Instance]
    lb_url: str
    probe_key: str
    faults: Faults
    samples: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stop.set()

    async def healthy(self, http: httpx.AsyncClient) -> bool:
        every = True
        for instance in self.instances:
            if not instance.running() or instance.stopped:
                every = False
                continue
            try:
                ready = (await http.get(f"{instance.url}/readyz")).status_code == 200
            except httpx.HTTPError:
                ready = False
            instance.ready = instance.ready or ready
            every = every and ready
        if not every:
            return False
        try:
            probe = await http.get(
                f"{self.lb_url}/v1/subscriptions",
                headers={"Authorization": f"Bearer {self.probe_key}"},
            )
        except httpx.HTTPError:
            return False
        return probe.status_code == 200

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=3) as http:
            while not self._stop.is_set():
                self._restart_the_dead()
                if await self.healthy(http):
                    now = time.monotonic()
                    for record in self.faults.records:
                        if record.lifted is not None and record.healthy_at is None:
                            record.healthy_at = now
                self.samples += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.5)

    def _restart_the_dead(self) -> None:
        """An instance that exited on its own is a finding; restart it, as systemd would."""
        for instance in self.instances:
            if instance.process is not None and instance.process.poll() is not None:
                if instance.name in self.faults._busy:
                    continue  # killed by the soak, being restarted
                self.unexpected_exits.append(
                    f"{instance.name} exited by itself with {instance.process.returncode}"
                )
                instance.note_unexpected_exit()
                instance.start()
