"""The webhook endpoint: refused deliveries store nothing; verified ones are stored once."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import anyio
import asyncpg
import httpx
import pytest

from app.settings import Settings
from tests.support.stack import Stack, running_stack, wait_for
from tests.support.stripe_events import deliver, make_event, signature, stripe_object

pytestmark = pytest.mark.anyio


async def stored_events(stack: Stack) -> int:
    async with stack.app.state.services.pool.acquire() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM webhook_events")
        return count


def secret(stack: Stack) -> str:
    return stack.settings.stripe_webhook_secrets[0]


async def test_refused_deliveries_are_400_and_store_nothing(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        event = make_event("invoice.created", stripe_object("invoice"))
        body = json.dumps(event)
        anonymous = stack.anonymous
        missing = await anonymous.post("/v1/webhooks/stripe", content=body)
        wrong = await deliver(anonymous, event, "whsec_not_ours")
        stale = await deliver(anonymous, event, secret(stack), timestamp=int(time.time()) - 301)
        tampered = await anonymous.post(
            "/v1/webhooks/stripe",
            content=body.replace("invoice.created", "invoice.paid"),
            headers={"Stripe-Signature": signature(body, secret(stack))},
        )
        for answer, code in [
            (missing, "missing_signature"),
            (wrong, "invalid_signature"),
            (stale, "invalid_signature"),
            (tampered, "invalid_signature"),
        ]:
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == code
        assert await stored_events(stack) == 0


@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        "[]",
        '{"object": "event"}',
        '{"id": "evt_1", "object": "event", "type": "x", "created": "yesterday", "data": {}}',
        '{"id": "cus_1", "object": "customer"}',
        '{"id": "evt_1", "object": "event", "type": "x", "created": 1,'
        ' "data": {"object": {"a": "\\u0000"}}}',
    ],
)
async def test_a_verified_body_that_is_not_a_stripe_event_is_400(
    settings: Settings, body: str
) -> None:
    async with running_stack(settings) as stack:
        answer = await deliver(stack.anonymous, body, secret(stack))
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "invalid_payload"
        assert await stored_events(stack) == 0


async def test_a_body_over_one_mebibyte_is_413(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        event = make_event("invoice.created", stripe_object("invoice", description="x" * 1_100_000))
        answer = await deliver(stack.anonymous, event, secret(stack))
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "payload_too_large"
        assert await stored_events(stack) == 0


async def test_any_configured_secret_verifies_during_rotation(settings: Settings) -> None:
    async with running_stack(settings, extra_webhook_secrets=("whsec_next",)) as stack:
        event = make_event("invoice.created", stripe_object("invoice"))
        answer = await deliver(stack.anonymous, event, "whsec_next")
        assert answer.status_code == 200, answer.text
        assert await stored_events(stack) == 1


async def test_an_unhandled_event_is_acknowledged_kept_and_audited(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        invoice = stripe_object("invoice", id="in_someone_else")
        event = make_event("invoice.created", invoice)
        first = await deliver(stack.anonymous, event, secret(stack))
        again = await deliver(stack.anonymous, event, secret(stack))
        assert first.status_code == again.status_code == 200
        assert first.json()["duplicate"] is False
        assert again.json()["duplicate"] is True
        pool = stack.app.state.services.pool

        async def processed() -> bool:
            async with pool.acquire() as conn:
                status = await conn.fetchval(
                    "SELECT status FROM webhook_events WHERE id = $1", event["id"]
                )
            return bool(status == "processed")

        await wait_for(processed, what="the event to be processed")
        async with pool.acquire() as conn:
            audit = await conn.fetch(
                "SELECT subject_id, user_id FROM audit_log WHERE kind = 'stripe.invoice.created'"
            )
        assert [(r["subject_id"], r["user_id"]) for r in audit] == [("in_someone_else", None)]


async def test_the_same_event_five_times_at_once_has_one_effect(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "once")
        events = await stack.paid_events(started["checkout_session_id"])
        completed = events["checkout.session.completed"]
        answers: list[httpx.Response] = []

        async def one() -> None:
            answers.append(await deliver(stack.anonymous, completed, secret(stack)))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
        assert [a.status_code for a in answers] == [200] * 5
        assert sorted(a.json()["duplicate"] for a in answers) == [False, True, True, True, True]
        await stack.wait_for_status(started["subscription_id"], "active")
        async with stack.app.state.services.pool.acquire() as conn:
            operations = await conn.fetchval(
                "SELECT count(*) FROM operations WHERE subject_id = $1", started["subscription_id"]
            )
            paid_audits = await conn.fetchval(
                "SELECT count(*) FROM audit_log WHERE kind = 'subscription.paid'"
            )
        assert operations == 1
        assert paid_audits == 1


async def test_one_unstorable_event_among_many_at_once_refuses_only_that_one(
    settings: Settings,
) -> None:
    # Events arriving together are written by one INSERT: one that PostgreSQL cannot store
    # must not take the others down with it.
    async with running_stack(settings) as stack:
        good = [make_event("invoice.created", stripe_object("invoice")) for _ in range(8)]
        bad = make_event("invoice.created", stripe_object("invoice", description="a\u0000b"))
        answers: dict[str, httpx.Response] = {}

        async def send(event: dict[str, object]) -> None:
            answers[str(event["id"])] = await deliver(stack.anonymous, event, secret(stack))

        async with anyio.create_task_group() as tg:
            for event in [*good[:4], bad, *good[4:]]:
                tg.start_soon(send, event)
        assert answers[bad["id"]].status_code == 400
        assert answers[bad["id"]].json()["error"]["code"] == "invalid_payload"
        assert all(answers[e["id"]].status_code == 200 for e in good)
        async with stack.app.state.services.pool.acquire() as conn:
            stored = {r["id"] for r in await conn.fetch("SELECT id FROM webhook_events")}
        assert stored >= {e["id"] for e in good}
        assert bad["id"] not in stored


@pytest.mark.parametrize(
    "mangle",
    [
        lambda header: header[:-8].encode() + "é".encode(),  # UTF-8 bytes
        lambda header: header[:-2].encode() + b"\xff\xfe",  # not even UTF-8
        lambda header: b"t=\x80\x81,v1=\xc3\xa9",
        lambda header: header.encode().replace(b"v1=", b"v1=\xe2\x80\x8b"),
    ],
)
async def test_a_signature_header_of_any_bytes_is_400_without_a_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture, mangle: Callable[[str], bytes]
) -> None:
    async with running_stack(settings) as stack:
        body = json.dumps(make_event("invoice.created", stripe_object("invoice")))
        answer = await stack.anonymous.post(
            "/v1/webhooks/stripe",
            content=body,
            headers={b"Stripe-Signature": mangle(signature(body, secret(stack)))},
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "invalid_signature"
        assert await stored_events(stack) == 0
        # A refused delivery is not an error of the server's: nothing to log per request.
        assert [r for r in caplog.records if r.exc_info or _server_error(r)] == []


async def test_an_event_whose_write_fails_is_503_with_retry_after_and_stored_once_later(
    settings: Settings,
) -> None:
    async with running_stack(settings) as stack:
        event = make_event("invoice.created", stripe_object("invoice"))
        assert settings.database_url is not None
        held = await asyncpg.connect(settings.database_url)
        answers: list[httpx.Response] = []

        async def send() -> None:
            answers.append(await deliver(stack.anonymous, event, secret(stack)))

        try:
            # Another writer holds the id in an open transaction: the intake's INSERT waits.
            await held.execute("BEGIN")
            await held.execute(
                "INSERT INTO webhook_events (id, type, stripe_created, payload)"
                " VALUES ($1, 'held', now(), '{}')",
                event["id"],
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                with anyio.fail_after(20):
                    # The database drops the intake's connection mid-write, and again on
                    # its second try: the event is not stored.
                    while not answers:
                        # Not `held`: in its transaction pg_stat_activity is one snapshot.
                        await stack.app.state.services.pool.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                            " AND wait_event_type = 'Lock'"
                            " AND query LIKE 'INSERT INTO webhook_events%'"
                        )
                        await anyio.sleep(0.05)
        finally:
            await held.execute("ROLLBACK")
            await held.close()
        assert answers[0].status_code == 503, answers[0].text
        assert answers[0].json()["error"]["code"] == "unavailable"
        assert int(answers[0].headers["Retry-After"]) > 0
        assert await stored_events(stack) == 0
        again = await deliver(stack.anonymous, event, secret(stack))
        assert again.status_code == 200, again.text
        assert again.json()["duplicate"] is False
        assert await stored_events(stack) == 1


def _server_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR and record.name.startswith(("app", "uvicorn"))
