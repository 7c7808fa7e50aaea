"""/metrics answers what an operator watches, in Prometheus' text format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from tests.support.stack import running_stack

pytestmark = pytest.mark.anyio


async def test_metrics_follow_a_purchase(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        started = await stack.checkout("graph-standard", "measured")
        await stack.pay(started["checkout_session_id"])
        await stack.wait_for_status(started["subscription_id"], "active")
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
