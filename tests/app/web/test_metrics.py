"""/metrics answers what an operator watches, in Prometheus' text format."""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from provisioning import GraphBackend
from provisioning.warm_pool import server_key
from tests.provisioning.support import drop_server_objects
from tests.support.stack import running_stack, wait_for
from tests.support.stripe_events import deliver, make_event, stripe_object

pytestmark = pytest.mark.anyio


async def test_metrics_follow_a_purchase(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "measured")
        await stack.pay(started["checkout_session_id"])
        active = await stack.wait_for_status(started["subscription_id"], "active")
        await stack.wait_for_end_published(active["operation_id"])
        async with stack.http.stream("GET", "/v1/events") as stream:
            assert stream.status_code == 200
            answer = await stack.anonymous.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }
        assert (
            samples[("lookout_operations", (("kind", "provision"), ("status", "completed")))] == 1
        )
        assert samples[("lookout_open_streams", ())] == 1
        assert samples[("lookout_events_published_total", (("type", "operation.completed"),))] == 1
        assert samples[("lookout_webhook_inbox_events", (("status", "processed"),))] >= 4
        assert ("lookout_webhook_inbox_oldest_unprocessed_seconds", ()) in samples
        assert ("lookout_slow_clients_dropped_total", ()) in samples
        assert ("lookout_redis_reconnects_total", ()) in samples
        # The one provisioning server (DATABASE_URL's): the graph is counted on it.
        (server,) = settings.provisioning_servers
        on_it = (("server", server.name),)
        assert samples[("lookout_provisioning_server_graphs", on_it)] == 1
        assert samples[("lookout_provisioning_server_weight", on_it)] == server.weight
        assert samples[("lookout_provisioning_server_up", on_it)] == 1
        assert samples[("lookout_provisioning_server_drained", on_it)] == 0
        assert (
            samples[
                ("lookout_operation_duration_seconds", (("kind", "provision"), ("quantile", "0.5")))
            ]
            > 0
        )


async def test_metrics_count_webhooks_pending_retrying_and_failed(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        async with stack.app.state.services.pool.acquire() as conn:
            # Stored by an earlier instance, and not due yet: the worker leaves them be.
            await conn.execute(
                "INSERT INTO webhook_events (id, type, stripe_created, payload, status,"
                " attempts, last_error, last_error_kind, next_attempt_at) VALUES"
                " ('evt_down', 'invoice.paid', now(), '{}', 'retrying', 30,"
                "  'PaymentProviderUnavailable: Stripe is unavailable', 'transient',"
                "  now() + interval '1 hour'),"
                " ('evt_bug', 'invoice.paid', now(), '{}', 'failed', 8, 'KeyError: x',"
                "  'permanent', now()),"
                " ('evt_later', 'invoice.paid', now(), '{}', 'pending', 0, NULL, NULL,"
                "  now() + interval '1 hour')"
            )
        answer = await stack.anonymous.get("/metrics")
        assert answer.status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }
        assert samples[("lookout_webhooks_pending", ())] == 2
        assert samples[("lookout_webhooks_retrying", (("error", "transient"),))] == 1
        assert samples[("lookout_webhooks_retrying", (("error", "permanent"),))] == 0
        assert samples[("lookout_webhooks_failed", ())] == 1


ACK = "lookout_webhook_ack_seconds"


def histogram_count(text: str, name: str) -> float:
    counts = [
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for s in family.samples
        if s.name == f"{name}_count"
    ]
    assert len(counts) == 1, f"{name} is not in /metrics"
    return counts[0]


async def test_server_side_latency_histograms_follow_a_purchase(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        # A refusal is no acknowledgement: not timed. (Nothing else is delivered yet.)
        before = histogram_count((await stack.anonymous.get("/metrics")).text, ACK)
        event = make_event("invoice.created", stripe_object("invoice"))
        refused = await deliver(stack.anonymous, event, "whsec_not_ours")
        assert refused.status_code == 400
        assert histogram_count((await stack.anonymous.get("/metrics")).text, ACK) == before
        started = await stack.checkout("graph-standard", "timed")
        # The checkout's own event confirms the payment as it is stored (timed); sent alone, so
        # that no invoice or subscription event has the inbox worker fulfil it first (not timed).
        events = await stack.paid_events(started["checkout_session_id"])
        secret = stack.settings.stripe_webhook_secrets[0]
        for event_type in ("checkout.session.completed", "invoice.created"):
            answer = await deliver(stack.anonymous, events[event_type], secret)
            assert answer.status_code == 200, answer.text
        await stack.wait_for_status(started["subscription_id"], "active")
        answer = await stack.anonymous.get("/metrics")
        health = (await stack.anonymous.get("/healthz")).json()
    text = answer.text
    # The two sent here, and whatever the emulator delivered since (subscription updates).
    assert histogram_count(text, ACK) >= 2
    # The one payment: from its webhook's receipt to its operation.started.
    assert histogram_count(text, "lookout_webhook_received_to_operation_started_seconds") == 1
    assert histogram_count(text, "lookout_event_loop_lag_seconds") > 0
    # Each event stored, in its two phases: waiting for a writer, then its group's write.
    written = {
        s.labels["phase"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "lookout_webhook_write_seconds"
        for s in family.samples
        if s.name == "lookout_webhook_write_seconds_count"
    }
    assert written.keys() == {"waiting", "writing"}
    assert written["waiting"] == written["writing"] >= 2
    assert 'lookout_webhook_ack_seconds_bucket{le="0.025"}' in text
    info = [
        s.labels
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "lookout_process_info"
    ]
    assert info == [{"pid": str(os.getpid()), "worker": "0"}]
    assert health == {"status": "ok", "pid": os.getpid(), "worker": 0}


async def test_metrics_show_the_warm_pool_a_purchase_took_from(
    settings: Settings, pg_admin_dsn: str
) -> None:
    prefix = f"lkt{secrets.token_hex(4)}_"
    backend = GraphBackend(pg_admin_dsn, name_prefix=prefix)
    try:
        async with running_stack(replace(settings, warm_pool_size=2), backends=[backend]) as stack:
            pool = stack.app.state.services.pool

            async def level() -> int:
                ready: int = await pool.fetchval(
                    "SELECT count(*) FROM warm_pool WHERE state = 'ready'"
                )
                return ready

            await wait_for(lambda: _at(level, 2), what="the warm pool to fill")
            started = await stack.checkout("graph-standard", "pooled")
            await stack.pay(started["checkout_session_id"])
            found = await stack.wait_for_status(started["subscription_id"], "active")
            claimed = await pool.fetchval(
                "SELECT count(*) FROM warm_pool WHERE claimed_by = $1", found["resource_id"]
            )
            assert claimed == 1
            await wait_for(lambda: _at(level, 2), what="the warm pool to be refilled")
            answer = await stack.anonymous.get("/metrics")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }
        server = ("server", server_key(pg_admin_dsn))
        assert samples[("lookout_warm_pool_databases", (server, ("state", "ready")))] == 2
        assert samples[("lookout_warm_pool_databases", (server, ("state", "creating")))] == 0
        assert samples[("lookout_warm_pool_size", (server,))] == 2
    finally:
        await drop_server_objects(pg_admin_dsn, prefix)


async def _at(read: Callable[[], Awaitable[int]], value: int) -> bool:
    return await read() == value
