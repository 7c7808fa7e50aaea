from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streams import RedisClient
from streams.hub import EventHub
from streams.leases import StreamLease, StreamLeases, TooManyStreams
from streams.sse import EventStreamResponse, StreamOptions, StreamRefused
from streams.tokens import ExpiredStreamToken, InvalidStreamToken, StreamGrant, StreamTokens
from tests.streams.sse_client import read_sse, wait_until
from tests.streams.support import Snapshots
from tests.streams.vocabulary import TERMINAL_TYPES
from tests.support.live import live_server
from tests.support.redis_server import redis_process

pytestmark = pytest.mark.anyio


async def test_the_limit_refuses_one_more_across_instances(
    redis: RedisClient, redis_prefix: str
) -> None:
    one = StreamLeases(redis, prefix=redis_prefix, limit=3)
    two = StreamLeases(redis, prefix=redis_prefix, limit=3)  # another instance
    held = [await one.acquire("usr_a"), await two.acquire("usr_a"), await one.acquire("usr_a")]
    with pytest.raises(TooManyStreams) as refused:
        await two.acquire("usr_a")
    assert refused.value.retry_after >= 1
    assert "3 open event streams" in str(refused.value)
    other_user = await two.acquire("usr_b")  # limits are per user
    assert await one.count("usr_a") == 3
    await held[0].release()
    await held[0].release()
    replacement = await two.acquire("usr_a")
    assert await one.count("usr_a") == 3
    for lease in (*held[1:], replacement, other_user):
        await lease.release()
    assert await one.count("usr_a") == 0


async def test_leases_of_a_dead_process_lapse_and_held_ones_are_renewed(
    redis: RedisClient, redis_prefix: str
) -> None:
    dead = StreamLeases(redis, prefix=redis_prefix, limit=1, ttl_seconds=1)
    alive = StreamLeases(redis, prefix=redis_prefix, limit=1, ttl_seconds=1)
    await dead.acquire("usr_dead")  # never renewed: its process "died"
    with pytest.raises(TooManyStreams):
        await alive.acquire("usr_dead")
    with anyio.fail_after(10):
        while True:
            try:
                lease = await alive.acquire("usr_dead")
                break
            except TooManyStreams:
                await anyio.sleep(0.1)
    async with anyio.create_task_group() as tg:
        await tg.start(alive.run)
        await anyio.sleep(2.5)  # well past the ttl: only renewal keeps it
        assert await alive.count("usr_dead") == 1
        tg.cancel_scope.cancel()
    await lease.release()


async def test_an_open_stream_holds_its_lease_until_it_ends(
    hub: EventHub, redis: RedisClient, redis_prefix: str, snapshots: Snapshots
) -> None:
    leases = StreamLeases(redis, prefix=redis_prefix, limit=1)

    async def take() -> StreamLease:
        try:
            return await leases.acquire("usr_l")
        except TooManyStreams as exc:
            body = {"error": {"code": "too_many_streams", "message": str(exc)}}
            refusal = JSONResponse(body, 429, headers={"Retry-After": str(exc.retry_after)})
            raise StreamRefused(refusal, str(exc)) from None

    async def events(request: Request) -> Response:
        return EventStreamResponse.for_user(
            hub, "usr_l", last_event_id=None, snapshot=snapshots, take_lease=take,
            options=StreamOptions(max_seconds=None),
        )  # fmt: skip

    app = Starlette(routes=[Route("/events", events)])
    async with live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        async with client.stream("GET", "/events") as first:
            # Held, not discarded: an async generator collected half-read is closed on the
            # loop's next turns (its hooks call aclose()), and httpx closes the connection
            # with it, which ends the stream and frees its place before the second asks.
            first_events = read_sse(first)
            assert (await anext(first_events)).kind == "retry"
            second = await client.get("/events")
            assert second.status_code == 429
            assert int(second.headers["Retry-After"]) >= 1
            assert second.json()["error"]["code"] == "too_many_streams"

        async def released() -> bool:
            return await leases.count("usr_l") == 0

        await wait_until(released)
        async with client.stream("GET", "/events") as third:
            assert third.status_code == 200


async def test_a_client_gone_while_redis_stalls_the_start_gives_its_place_back(
    redis: RedisClient, redis_prefix: str, snapshots: Snapshots, tmp_path: Path
) -> None:
    """The hub's Redis stops answering (SIGSTOP) while a stream starts, after its lease was
    taken: the client that gives up must not keep its place for as long as Redis stalls."""
    leases = StreamLeases(redis, prefix=redis_prefix, limit=1)

    async def events(request: Request) -> Response:
        return EventStreamResponse.for_user(
            hub, "usr_s", last_event_id=None, snapshot=snapshots,
            take_lease=lambda: leases.acquire("usr_s"), options=StreamOptions(max_seconds=None),
        )  # fmt: skip

    async def open_streams(expected: int) -> bool:
        return await leases.count("usr_s") == expected

    with redis_process(tmp_path, persistence="none") as server:
        await server.wait_ready()
        stalling = server.client()
        try:
            async with (
                EventHub(
                    stalling, prefix=redis_prefix, tick_seconds=0.05, terminal_types=TERMINAL_TYPES
                ) as hub,
                anyio.create_task_group() as renewer,
            ):
                await hub.wait_connected()
                await renewer.start(leases.run)
                app = Starlette(routes=[Route("/events", events)])
                async with (
                    live_server(app) as base,
                    httpx.AsyncClient(base_url=base, timeout=30) as client,
                ):
                    server.pause()

                    async def give_up_waiting() -> None:
                        async with client.stream("GET", "/events"):
                            raise AssertionError("no answer can come from a stopped Redis")

                    async with anyio.create_task_group() as attempt:
                        attempt.start_soon(give_up_waiting)
                        await wait_until(lambda: open_streams(1))
                        await anyio.sleep(0.3)  # the start now waits on the stopped Redis
                        attempt.cancel_scope.cancel()  # the client closes its connection

                    await wait_until(lambda: open_streams(0), within=5)
                    assert leases.held == 0
                    server.resume()
                    async with client.stream("GET", "/events") as again:
                        assert again.status_code == 200
                        assert (await anext(read_sse(again))).kind == "retry"
                renewer.cancel_scope.cancel()
        finally:
            await stalling.aclose()


def test_tokens_are_bound_to_a_user_and_expire() -> None:
    now = [1_700_000_000.0]
    tokens = StreamTokens("k" * 32, clock=lambda: now[0])
    token, expires_at = tokens.issue("usr_1", ttl=300)
    assert expires_at.timestamp() == 1_700_000_300
    assert expires_at.tzinfo is not None
    assert tokens.verify(token) == "usr_1"

    version, payload, mac = token.split(".")
    forged = StreamTokens("z" * 32, clock=lambda: now[0]).issue("usr_2", ttl=300)[0]
    for bad in (
        "",
        "garbage",
        f"{version}.{forged.split('.')[1]}.{mac}",  # another user's payload, this MAC
        f"{version}.{payload}.{mac[:-2]}AA",
        forged,  # signed with another key
        f"v2.{payload}.{mac}",
        "é",  # a query string may hold anything
        f"{version}.{payload}.{mac[:-1]}é",
        f"{version}.é.{mac}",
    ):
        with pytest.raises(InvalidStreamToken):
            tokens.verify(bad)
    now[0] += 300
    with pytest.raises(ExpiredStreamToken, match="expired"):
        tokens.verify(token)
    with pytest.raises(ValueError, match="at least 16"):
        StreamTokens("short")


def test_a_token_names_the_credential_it_was_issued_on() -> None:
    tokens = StreamTokens("k" * 32)
    token, _ = tokens.issue("usr_1", ttl=300, credential="key_1")
    assert tokens.grant(token) == StreamGrant("usr_1", "key_1")
    assert tokens.verify(token) == "usr_1"
    assert tokens.grant(tokens.issue("usr_1", ttl=300)[0]) == StreamGrant("usr_1", None)
    # The credential is under the MAC: another one cannot be put in.
    version, _, mac = token.split(".")
    other, _ = tokens.issue("usr_1", ttl=300, credential="key_2")
    with pytest.raises(InvalidStreamToken):
        tokens.grant(f"{version}.{other.split('.')[1]}.{mac}")


async def test_one_renewal_keeps_every_users_leases(redis: RedisClient, redis_prefix: str) -> None:
    # Users' sets are in many slots of a cluster, where one script may touch one slot only.
    leases = StreamLeases(redis, prefix=redis_prefix, limit=2, ttl_seconds=1)
    users = [f"usr_{n}" for n in range(12)]
    held = [await leases.acquire(user) for user in users]
    for _ in range(4):  # 2 s: twice the ttl, only renewals keep them
        await anyio.sleep(0.5)
        await leases.renew()
    assert [await leases.count(user) for user in users] == [1] * len(users)
    for lease in held:
        await lease.release()
    assert [await leases.count(user) for user in users] == [0] * len(users)
