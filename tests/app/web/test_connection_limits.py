"""Connections and requests are bounded: each attack performed for real, on raw sockets against
the app served as `lookout serve` serves it (app.server), or against the process itself."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import anyio
import anyio.abc
import asyncpg
import httpx
import pytest
from httpx_sse import aconnect_sse

from app.settings import Settings
from app.web.ratelimit import LIMITS
from streams import Event, user_topic
from tests.support.process import process_stripe, serve_process
from tests.support.stack import Stack, running_stack, wait_for
from tests.support.stripe_events import deliver, make_event, signature, stripe_object

pytestmark = pytest.mark.anyio


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str:
        code: str = json.loads(self.body)["error"]["code"]
        return code


@contextlib.asynccontextmanager
async def raw(url: str) -> AsyncIterator[anyio.abc.SocketStream]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    async with await anyio.connect_tcp(parts.hostname, parts.port) as stream:
        yield stream


async def answer_of(stream: anyio.abc.SocketStream) -> Answer:
    """Everything the server sends until it ends the connection, as one answer."""
    data = b""
    with anyio.fail_after(20):
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


async def trickle(stream: anyio.abc.SocketStream, data: bytes, *, every: float = 0.1) -> None:
    """Sends `data` a byte at a time until it is sent or the server stops reading."""
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        for byte in data:
            await stream.send(bytes([byte]))
            await anyio.sleep(every)


async def stored_events(stack: Stack) -> int:
    async with stack.app.state.services.pool.acquire() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM webhook_events")
        return count


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def webhook_head(stack: Stack, body: bytes, *, length: int | None = None) -> bytes:
    header = signature(body.decode(), stack.settings.stripe_webhook_secrets[0])
    return (
        b"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Stripe-Signature: " + header.encode() + b"\r\n"
        b"Content-Length: " + str(length or len(body)).encode() + b"\r\n\r\n"
    )


def event_body() -> bytes:
    return json.dumps(make_event("invoice.created", stripe_object("invoice"))).encode()


async def test_slow_headers_get_408_at_the_deadline_and_idle_connections_are_closed(
    settings: Settings,
) -> None:
    async with (
        running_stack(replace(settings, header_timeout_seconds=1)) as stack,
        contextlib.AsyncExitStack() as idle_connections,
    ):
        # Connections that send nothing at all: held as long as a trickle, once.
        idle = [await idle_connections.enter_async_context(raw(stack.url)) for _ in range(20)]
        async with raw(stack.url) as stream, anyio.create_task_group() as group:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            # Ten bytes a second, forever: a header line that never ends.
            group.start_soon(trickle, stream, b"X-Slow: " + b"a" * 10_000)
            answer = await answer_of(stream)
            group.cancel_scope.cancel()
        assert answer.status == 408
        assert answer.error_code() == "request_timeout"
        assert answer.headers["connection"] == "close"
        for connection in idle:
            with anyio.fail_after(20), pytest.raises(anyio.EndOfStream):
                await connection.receive()


async def test_a_trickled_body_is_cut_off_while_a_stream_outlives_the_deadline(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        running_stack(replace(settings, body_timeout_seconds=1)) as stack,
        aconnect_sse(stack.http, "GET", "/v1/events") as source,
    ):
        assert source.response.status_code == 200
        body = event_body()
        checkout = json.dumps({"plan": "graph-standard", "resource_name": "slow"}).encode()
        heads_and_bodies = [
            (webhook_head(stack, body), body),
            (
                b"POST /v1/checkout HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer " + stack.api_key.encode() + b"\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(len(checkout)).encode() + b"\r\n\r\n",
                checkout,
            ),
        ]
        answers: list[Answer] = []

        async def send_slowly(head: bytes, content: bytes) -> None:
            async with raw(stack.url) as stream, anyio.create_task_group() as group:
                await stream.send(head + content[:5])
                group.start_soon(trickle, stream, content[5:])
                answers.append(await answer_of(stream))
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for head, content in heads_and_bodies:
                group.start_soon(send_slowly, head, content)
        assert [(a.status, a.error_code()) for a in answers] == [(408, "request_timeout")] * 2
        assert await stored_events(stack) == 0
        # The stream, older than the body deadline now, still carries what is published.
        sent = await stack.app.state.services.publisher.publish(
            Event.create("subscription.updated", subscription_id="sub_x"),
            [user_topic(stack.user_id)],
        )
        with anyio.fail_after(10):
            async for sse in source.aiter_sse():
                if sse.data:
                    assert sse.id == sent[user_topic(stack.user_id)]
                    break
        assert errors_logged(caplog) == []


async def test_headers_over_16_kib_answer_431(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        async with raw(stack.url) as stream:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            await stream.send(b"a" * 64 * 1024 + b"\r\n\r\n")
            answer = await answer_of(stream)
        assert answer.status == 431
        assert answer.error_code() == "headers_too_large"
        # Just under the limit is served.
        fits = await stack.anonymous.get("/healthz", headers={"X-Big": "a" * 15 * 1024})
        assert fits.status_code == 200
        # The limit is per request: two pipelined in one write, together over it, are served.
        async with raw(stack.url) as stream:
            request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: %s\r\n\r\n"
            await stream.send(request % (b"a" * 10_000) + request % (b"b" * 10_000))
            received = b""
            with anyio.fail_after(10):
                while received.count(b"HTTP/1.1 200") < 2:
                    received += await stream.receive()


async def test_past_the_connection_limit_a_new_connection_gets_503(settings: Settings) -> None:
    async with running_stack(replace(settings, max_connections=3)) as stack:
        async with contextlib.AsyncExitStack() as held:
            for _ in range(3):
                # Each of the three is served, then stays open (kept alive).
                client = await held.enter_async_context(httpx.AsyncClient(base_url=stack.url))
                assert (await client.get("/healthz")).status_code == 200
            refused = await stack.anonymous.get("/healthz")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_busy"
            assert refused.headers["retry-after"] == "1"

        async def served() -> bool:
            return (await stack.anonymous.get("/healthz")).status_code == 200

        await wait_for(served, within=10, what="a connection to be served once others closed")


async def test_json_nested_30000_deep_is_a_400_on_the_api_and_the_webhook(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    deep = "[" * 30_000 + "]" * 30_000
    async with running_stack(settings) as stack:
        answer = await stack.http.post(
            "/v1/checkout", content=deep, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "invalid_json"
        signed = await deliver(stack.anonymous, '{"deep": ' + deep + "}", secret(stack))
        assert signed.status_code == 400, signed.text
        assert signed.json()["error"]["code"] == "invalid_payload"
        assert await stored_events(stack) == 0
        assert errors_logged(caplog) == []


def secret(stack: Stack) -> str:
    return stack.settings.stripe_webhook_secrets[0]


async def test_a_client_that_drops_mid_webhook_is_no_error(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_stack(settings) as stack:
        body = event_body()
        async with raw(stack.url) as stream:
            await stream.send(webhook_head(stack, body) + body[: len(body) // 2])

        async def noticed() -> bool:
            return any("client went away" in r.getMessage() for r in caplog.records)

        await wait_for(noticed, within=10, what="the server to notice the client left")
        assert await stored_events(stack) == 0
        assert errors_logged(caplog) == []


async def bad_key(http: httpx.AsyncClient, n: int, forwarded_for: str) -> int:
    answer = await http.get(
        "/v1/subscriptions",
        headers={"Authorization": f"Bearer lk_not_a_key_{n}", "X-Forwarded-For": forwarded_for},
    )
    return answer.status_code


async def test_a_rotated_x_forwarded_for_from_an_untrusted_peer_is_still_limited(
    settings: Settings,
) -> None:
    limit = int(LIMITS["bad_keys"].split("/")[0])
    async with running_stack(settings) as stack:
        answers = [await bad_key(stack.anonymous, n, f"203.0.113.{n}") for n in range(limit + 1)]
        assert answers == [401] * limit + [429]


async def test_from_a_trusted_proxy_the_forwarded_address_is_the_one_limited(
    settings: Settings,
) -> None:
    limit = int(LIMITS["bad_keys"].split("/")[0])
    async with running_stack(replace(settings, trusted_proxies=("127.0.0.1",))) as stack:
        rotated = [await bad_key(stack.anonymous, n, f"203.0.113.{n}") for n in range(limit + 1)]
        assert rotated == [401] * (limit + 1)
        one = [await bad_key(stack.anonymous, n, "198.51.100.7") for n in range(limit + 1)]
        assert one == [401] * limit + [429]
        assert await bad_key(stack.anonymous, 0, "198.51.100.8") == 401


async def test_an_address_over_the_bad_key_limit_is_refused_before_any_lookup(
    settings: Settings,
) -> None:
    limit = int(LIMITS["bad_keys"].split("/")[0])
    async with running_stack(replace(settings, trusted_proxies=("127.0.0.1",))) as stack:
        guesser = "198.51.100.7"
        answers = [await bad_key(stack.anonymous, n, guesser) for n in range(limit)]
        assert answers == [401] * limit
        assert stack.settings.database_url is not None
        locker = await asyncpg.connect(stack.settings.database_url)
        try:
            async with locker.transaction():
                # No lookup of a key can finish while this is held.
                await locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
                with anyio.move_on_after(1) as waited:
                    await bad_key(stack.anonymous, 0, "198.51.100.8")
                assert waited.cancelled_caught, "a key lookup went through the lock"
                with anyio.fail_after(10):
                    assert await bad_key(stack.anonymous, limit, guesser) == 429
        finally:
            await locker.close()


async def test_unsigned_webhook_floods_get_429_while_a_signed_delivery_gets_200(
    settings: Settings,
) -> None:
    limit = int(LIMITS["unverified_webhooks"].split("/")[0])
    async with running_stack(settings) as stack:
        body = event_body()
        unsigned = [
            (await stack.anonymous.post("/v1/webhooks/stripe", content=body)).status_code
            for _ in range(limit + 1)
        ]
        assert unsigned == [400] * limit + [429]
        forged = await deliver(stack.anonymous, body, "whsec_not_ours")
        assert forged.status_code == 429
        assert forged.json()["error"]["code"] == "rate_limited"
        assert int(forged.headers["Retry-After"]) >= 1
        valid = await deliver(stack.anonymous, body, secret(stack))
        assert valid.status_code == 200, valid.text
        assert await stored_events(stack) == 1


async def test_lookout_serve_bounds_headers_by_size_and_time(settings: Settings) -> None:
    async with (
        process_stripe(replace(settings, header_timeout_seconds=1)) as stripe,
        serve_process(stripe.settings, port=stripe.port) as process,
    ):
        async with raw(process.url) as stream:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            await stream.send(b"a" * 64 * 1024 + b"\r\n\r\n")
            assert (await answer_of(stream)).status == 431
        async with raw(process.url) as stream, anyio.create_task_group() as group:
            await stream.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            group.start_soon(trickle, stream, b"X-Slow: " + b"a" * 10_000)
            assert (await answer_of(stream)).status == 408
            group.cancel_scope.cancel()
