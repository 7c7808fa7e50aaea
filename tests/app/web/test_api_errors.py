"""Every bad input gets a clear 4xx with the contract's error body, and nothing is lost."""

from __future__ import annotations

import pytest

from app.settings import Settings
from tests.support.stack import running_stack

pytestmark = pytest.mark.anyio


async def test_bad_checkout_requests_are_named(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        cases = [
            ({"content": b""}, 400, "invalid_json"),
            ({"content": b"{not json"}, 400, "invalid_json"),
            ({"content": b"[1, 2]"}, 400, "invalid_json"),
            ({"content": b"\xff\xfe"}, 400, "invalid_json"),
            ({"content": b"x" * 70_000}, 413, "payload_too_large"),
            (
                {"content": b"plan=x", "headers": {"content-type": "text/plain"}},
                415,
                "unsupported_media_type",
            ),
            ({"json": {"resource_name": "abc"}}, 400, "missing_plan"),
            ({"json": {"plan": 7, "resource_name": "abc"}}, 400, "invalid_plan"),
            ({"json": {"plan": "graph-huge", "resource_name": "abc"}}, 400, "unknown_plan"),
            ({"json": {"plan": "graph-standard"}}, 400, "missing_resource_name"),
            (
                {"json": {"plan": "graph-standard", "resource_name": "Bad Name!"}},
                400,
                "invalid_resource_name",
            ),
            (
                {"json": {"plan": "graph-standard", "resource_name": "x" * 200}},
                400,
                "invalid_resource_name",
            ),
            (
                {"json": {"plan": "graph-standard", "resource_name": "a\u0000b"}},
                400,
                "invalid_resource_name",
            ),
        ]
        for kwargs, status, code in cases:
            answer = await stack.http.post("/v1/checkout", **kwargs)  # type: ignore[arg-type]
            assert answer.status_code == status, (kwargs, answer.text)
            assert answer.json()["error"]["code"] == code, kwargs
            assert answer.json()["error"]["message"]
        assert (await stack.http.get("/v1/subscriptions")).json() == {"data": []}
        # The customer's words, not the JSON key's.
        bad_name = {"plan": "graph-standard", "resource_name": "Bad Name!"}
        message = (await stack.http.post("/v1/checkout", json=bad_name)).json()["error"]["message"]
        assert message.startswith("The name of your resource is not valid. Use 3 to 40")
        assert "resource_name" not in message


async def test_authentication_and_routing_errors(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        missing = await stack.anonymous.get("/v1/subscriptions")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "unauthorized"
        wrong = await stack.anonymous.get(
            "/v1/subscriptions", headers={"Authorization": "Bearer lk_nope"}
        )
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert (await stack.http.get("/v1/nowhere")).json()["error"]["code"] == "not_found"
        put = await stack.http.put("/v1/subscriptions")
        assert put.status_code == 405
        assert put.json()["error"]["code"] == "method_not_allowed"
        for path in (
            "/v1/subscriptions/sub_nope",
            "/v1/operations/op_nope",
            "/v1/graphs/gr_nope/subscription",
            "/v1/checkout/cs_nope",
        ):
            answer = await stack.http.get(path)
            assert answer.status_code == 404, path
            assert answer.json()["error"]["code"] == "not_found"


async def test_conflicts_are_409_with_what_to_do(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        first = await stack.checkout("graph-xlarge", "only-one")
        await stack.pay(first["checkout_session_id"])
        active = await stack.wait_for_status(first["subscription_id"], "active")

        taken = await stack.http.post(
            "/v1/checkout", json={"plan": "graph-standard", "resource_name": "only-one"}
        )
        assert taken.status_code == 409
        assert taken.json()["error"]["code"] == "resource_name_taken"
        over = await stack.http.post(
            "/v1/checkout", json={"plan": "graph-xlarge", "resource_name": "second"}
        )
        assert over.status_code == 409
        assert over.json()["error"]["code"] == "plan_limit_reached"

        pending = await stack.checkout("graph-standard", "not-paid")
        early = await stack.http.post(
            f"/v1/graphs/{(await stack.subscription(pending['subscription_id']))['resource_id']}"
            "/credentials"
        )
        assert early.status_code == 409
        assert early.json()["error"]["code"] == "graph_not_ready"
        not_cancellable = await stack.http.post(
            f"/v1/subscriptions/{pending['subscription_id']}/cancel"
        )
        assert not_cancellable.status_code == 409

        finished = await stack.http.delete(f"/v1/operations/{active['operation_id']}")
        assert finished.status_code == 200
        assert finished.json()["status"] == "completed"


async def test_a_second_checkout_for_the_same_name_expires_the_first(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        first = await stack.checkout("graph-standard", "retry-me")
        second = await stack.checkout("graph-standard", "retry-me")
        assert first["subscription_id"] != second["subscription_id"]
        assert (await stack.subscription(first["subscription_id"]))["status"] == "expired"
        session = (
            await stack.emulator.get(
                f"/v1/checkout/sessions/{first['checkout_session_id']}",
                headers={"Authorization": f"Bearer {stack.settings.stripe_api_key}"},
            )
        ).json()
        assert session["status"] == "expired"
