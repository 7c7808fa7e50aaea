"""Instances anywhere: two real `lookout serve` processes on one PostgreSQL and one Redis,
behind a round-robin TCP load balancer (bench.chaos.proxy.LoadBalancer), as a deployment runs
them: on this host, and each on a host of its own (a network namespace, where the tests may
make one). A client whose instance is killed, or drained by SIGTERM, resumes on the other by
Last-Event-ID with no gap and no duplicate; a paid graph whose webhook one instance took is
provisioned by the other when the first dies."""

from __future__ import annotations

import contextlib
import functools
import random
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import anyio
import asyncpg
import httpx
import pytest
from anyio.abc import TaskGroup
from redis.asyncio import Redis

from app.settings import Settings
from app.users import create_api_key, create_user
from bench.chaos.proxy import LoadBalancer, fault_proxy, url_through
from streams import Event, EventPublisher, stream_key, user_topic
from tests.app.test_takeover import pay_for_a_graph, server_objects, two_instances_setup
from tests.streams.sse_client import SSEItem, read_sse
from tests.support.live import free_port
from tests.support.netns import forwarded, hosts
from tests.support.process import ServeProcess, serve_process
from tests.support.stack import wait_for

pytestmark = pytest.mark.anyio


@dataclass
class Deployment:
    url: str  # the balancer's: LOOKOUT_PUBLIC_URL of both instances
    balancer: LoadBalancer
    instances: dict[int, ServeProcess]  # by pid (`--workers 1`: the instance is one process)


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@contextlib.asynccontextmanager
async def behind_a_balancer(
    first: Settings, second: Settings, *, port: int | None = None
) -> AsyncIterator[Deployment]:
    """Two instances (`first`'s and `second`'s settings) and a balancer on ``port`` in front."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    async with (
        serve_process(first, public_url=url) as a,
        serve_process(second, public_url=url) as b,
    ):
        balancer = LoadBalancer(port, [_port(a.url), _port(b.url)], random.Random(16))
        await balancer.accept()
        try:
            yield Deployment(url, balancer, {a.process.pid: a, b.process.pid: b})
        finally:
            await balancer.close()


@contextlib.asynccontextmanager
async def on_separate_hosts(settings: Settings) -> AsyncIterator[Deployment]:
    """Two instances, each on a host of its own (a network namespace: tests.support.netns)
    that reaches PostgreSQL, Redis, the provisioning servers and Stripe only through its
    link to this machine, and a balancer here in front of their addresses."""
    assert settings.database_url is not None and settings.redis_url is not None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers = {
        "database": settings.database_url,
        "redis": settings.redis_url,
        "stripe": settings.stripe_api_base,
        **{f"provisioner {i}": u for i, u in enumerate(settings.provisioner_database_urls)},
    }
    with hosts(2) as separate:
        async with contextlib.AsyncExitStack() as stack:
            instances: dict[int, ServeProcess] = {}
            addresses: list[tuple[str, int]] = []
            for host in separate:
                there = await stack.enter_async_context(forwarded(host, servers))
                placed = replace(
                    settings,
                    database_url=there.pop("database"),
                    redis_url=there.pop("redis"),
                    stripe_api_base=there.pop("stripe"),
                    provisioner_database_urls=tuple(there.values()),
                    trusted_proxies=(host.gateway,),
                    allowed_hosts_given=("127.0.0.1", "localhost", host.address),
                )
                instance = await stack.enter_async_context(
                    serve_process(placed, public_url=url, host=host.address, netns=host.netns)
                )
                instances[instance.process.pid] = instance
                addresses.append((host.address, _port(instance.url)))
            balancer = LoadBalancer(port, addresses, random.Random(16))
            await balancer.accept()
            try:
                yield Deployment(url, balancer, instances)
            finally:
                await balancer.close()


@contextlib.asynccontextmanager
async def one_connection(url: str, headers: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """A client that holds one connection (so one instance behind the balancer) at a time:
    the instance that answers its /healthz is the one its next request goes to."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:
        yield client


@dataclass
class Follower:
    """A client following /v1/events: the events it saw, across its reconnections."""

    seen: list[SSEItem] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    async def follow(
        self,
        client: httpx.AsyncClient,
        opened: anyio.Event,
        ended: anyio.Event,
        *,
        last_event_id: str | None = None,
    ) -> None:
        """Follows the stream until it breaks (its instance killed)."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with contextlib.suppress(httpx.TransportError):
                async with client.stream("GET", "/v1/events", headers=headers) as answer:
                    assert answer.status_code == 200
                    opened.set()  # the hub subscribed before the headers were sent
                    async for item in read_sse(answer):
                        if item.kind == "event":
                            self.seen.append(item)
                        elif item.kind == "comment":
                            self.comments.append(item.text)
        finally:
            ended.set()

    async def has(self, n: int) -> bool:
        return len(self.seen) >= n

    async def stream(
        self, tg: TaskGroup, client: httpx.AsyncClient, *, last_event_id: str | None = None
    ) -> anyio.Event:
        """Opens the stream in ``tg``; answers the event set when it ends."""
        opened, ended = anyio.Event(), anyio.Event()
        tg.start_soon(
            functools.partial(self.follow, last_event_id=last_event_id), client, opened, ended
        )
        with anyio.fail_after(10):
            await opened.wait()
        return ended


async def history(redis: Redis, key: str) -> list[str]:
    """The ids of the entries a topic's Stream keeps, in order: what the client must see."""
    entries = await redis.xrange(key) or []
    return [i.decode() if isinstance(i, bytes) else str(i) for i, _ in entries]


async def stop(instance: ServeProcess, how: str) -> None:
    """SIGKILL (no shutdown code runs) or SIGTERM (the drain), which must end within 10 s."""
    if how == "kill":
        instance.kill()
        return
    instance.process.send_signal(signal.SIGTERM)
    await anyio.to_thread.run_sync(functools.partial(instance.process.wait, timeout=10))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["one-host", "separate-hosts"])
@pytest.mark.parametrize("how", ["kill", "terminate"])
async def test_a_client_whose_instance_stops_resumes_on_the_other_without_gap(
    settings: Settings, how: str, where: str
) -> None:
    assert settings.database_url is not None and settings.redis_url is not None
    db = await asyncpg.connect(settings.database_url)
    try:
        user = await create_user(db, f"instances-{secrets.token_hex(3)}@example.com")
        auth = {"Authorization": f"Bearer {await create_api_key(db, user.id)}"}
    finally:
        await db.close()
    proxied = replace(settings, trusted_proxies=("127.0.0.1",))
    deployed = (
        behind_a_balancer(proxied, proxied) if where == "one-host" else on_separate_hosts(settings)
    )
    redis = Redis.from_url(settings.redis_url)
    publisher = EventPublisher(redis, prefix=settings.redis_prefix)
    topic = user_topic(user.id)

    async def publish(*numbers: int) -> None:
        for n in numbers:
            event = Event.create("subscription.updated", subscription_id=f"sub_{n}")
            await publisher.publish(event, [topic])

    follower = Follower()
    try:
        async with (
            deployed as deployment,
            anyio.create_task_group() as tg,
        ):
            async with one_connection(deployment.url, auth) as client:
                lost = (await client.get("/healthz")).json()["pid"]
                ended = await follower.stream(tg, client)
                await publish(1, 2, 3)
                await wait_for(lambda: follower.has(3), within=10, what="events 1 to 3")
                with anyio.fail_after(10):
                    await stop(deployment.instances[lost], how)
                    await ended.wait()
                await publish(4, 5, 6)  # while the client has no instance
            assert len(follower.seen) == 3
            # A drained instance says why the stream ends; a killed one cannot.
            goodbye = "server shutting down; reconnect to resume" in follower.comments
            assert goodbye == (how == "terminate")

            # As EventSource does: again at the same address, with the last id it saw.
            async with one_connection(deployment.url, auth) as client:
                survivor = (await client.get("/healthz")).json()["pid"]
                await follower.stream(tg, client, last_event_id=follower.seen[-1].id)
                await publish(7)
                await wait_for(lambda: follower.has(7), within=10, what="events 4 to 7")
                tg.cancel_scope.cancel()
        kept = await history(redis, stream_key(settings.redis_prefix, topic))
    finally:
        await redis.aclose()

    assert survivor != lost and survivor in deployment.instances
    seen = follower.seen
    assert [item.id for item in seen] == kept
    assert [item.json["subscription_id"] for item in seen] == [f"sub_{n}" for n in range(1, 8)]


def _pid(instance_id: str) -> int:
    """The process of an instance id (`host-pid-random`, as app.application makes it)."""
    return int(instance_id.rsplit("-", 2)[1])


@pytest.mark.timeout(90)
async def test_a_paid_graph_is_provisioned_by_the_other_instance_when_the_one_that_took_it_dies(
    settings: Settings, pg_admin_dsn: str
) -> None:
    async with (
        two_instances_setup(settings, pg_admin_dsn) as setup,
        fault_proxy("provisioner-b", pg_admin_dsn) as second_proxy,
    ):
        # Each instance reaches the provisioning server through a proxy of its own, both
        # holding every connection: whichever instance starts the provision (the balancer
        # chooses where Stripe's webhooks land) holds it in create_database.
        proxies = (setup.proxy, second_proxy)
        for proxy in proxies:
            proxy.stall()
        first = replace(setup.first_settings, trusted_proxies=("127.0.0.1",))
        second = replace(
            setup.settings,
            provisioner_database_urls=(url_through(pg_admin_dsn, second_proxy.port),),
            trusted_proxies=("127.0.0.1",),
        )
        # The balancer listens where the emulator sends its webhooks.
        async with behind_a_balancer(first, second, port=setup.port) as deployment:
            proxy_of = dict(zip(deployment.instances, proxies, strict=True))
            async with httpx.AsyncClient(base_url=deployment.url, headers=setup.auth) as http:
                subscription_id = await pay_for_a_graph(setup, http)

            async def held() -> asyncpg.Record | None:
                op = await setup.operation(subscription_id)
                if op is None or op["step"] != "create_database":
                    return None
                return op if proxy_of[_pid(op["lease_owner"])].connections > 0 else None

            op = await wait_for(held, within=30, what="the provision to be held")
            taker = _pid(op["lease_owner"])
            [other] = set(deployment.instances) - {taker}
            deployment.instances[taker].kill()
            proxy_of[other].unstall()

            async def finished() -> asyncpg.Record | None:
                now = await setup.operation(subscription_id)
                return now if now is not None and now["finalized_at"] is not None else None

            done = await wait_for(finished, within=30, what="the provision to finish")
            async with httpx.AsyncClient(base_url=deployment.url, headers=setup.auth) as http:
                answer = await http.get(f"/v1/subscriptions/{subscription_id}")

        assert _pid(done["lease_owner"]) == other
        assert done["status"] == "completed" and done["attempts"] == 2
        assert len(done["completed_steps"]) == len(set(done["completed_steps"]))
        assert answer.json()["status"] == "active"
        assert await server_objects(pg_admin_dsn, done["resource_id"]) == (1, 1)
        assert deployment.balancer.connections >= 3  # the checkout, the webhooks, the last GET
