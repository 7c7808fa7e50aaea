"""`lookout tail`: SSE parsing, one line per event, exit codes, and resuming after a drop."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from app.cli.tail.command import (
    MissingAPIKey,
    SSEMessage,
    SSEParser,
    TailError,
    exit_code_for,
    follow,
    reconnect_delay,
    render_line,
    run_tail,
)
from app.settings import ConfigError

OP = "op_0123456789abcdef01234567"
SUB = "sub_0123456789abcdef01234567"


def parse(text: str, parser: SSEParser | None = None) -> list[SSEMessage]:
    parser = parser or SSEParser()
    found = (parser.feed(line) for line in text.split("\n"))
    return [message for message in found if message is not None]


# ---- parsing -------------------------------------------------------------------------------


def test_one_event_with_id_type_and_data() -> None:
    messages = parse('id: 1-0\nevent: operation.started\ndata: {"a": 1}\n\n')
    assert messages == [SSEMessage("operation.started", '{"a": 1}', "1-0")]


def test_data_lines_are_joined_with_newlines() -> None:
    messages = parse("data: first\ndata:second\ndata:  third\n\n")
    # One space after the colon is dropped, no more.
    assert messages == [SSEMessage("message", "first\nsecond\n third", None)]


def test_comments_are_ignored_and_do_not_end_a_message() -> None:
    messages = parse(": keep-alive\n\nevent: x\n: in between\ndata: d\n\n: another\n\n")
    assert messages == [SSEMessage("x", "d", None)]


def test_retry_is_kept_and_a_malformed_one_ignored() -> None:
    parser = SSEParser()
    assert parse("retry: 3000\n\n", parser) == []
    assert parser.retry_ms == 3000
    parse("retry: soon\n\nretry: 15s\n\n", parser)
    assert parser.retry_ms == 3000
    parse("retry:1500\n\n", parser)
    assert parser.retry_ms == 1500


def test_last_event_id_persists_until_changed() -> None:
    parser = SSEParser()
    messages = parse("id: 7-1\ndata: a\n\ndata: b\n\nid: 8-0\ndata: c\n\n", parser)
    assert [m.id for m in messages] == ["7-1", "7-1", "8-0"]
    assert parser.last_event_id == "8-0"


def test_an_id_without_data_still_moves_the_position() -> None:
    parser = SSEParser("1-0")
    assert parse("id: 2-0\n\n", parser) == []
    assert parser.last_event_id == "2-0"


def test_an_empty_id_resets_and_an_id_with_nul_is_ignored() -> None:
    parser = SSEParser("5-0")
    parse("id: 6\x000\ndata: x\n\n", parser)
    assert parser.last_event_id == "5-0"
    parse("id\ndata: y\n\n", parser)
    assert parser.last_event_id is None


def test_a_field_without_colon_has_an_empty_value_and_unknown_fields_are_ignored() -> None:
    messages = parse("data\ndata\nfoo: bar\n\n")
    assert messages == [SSEMessage("message", "\n", None)]


def test_event_type_does_not_leak_into_the_next_message() -> None:
    messages = parse("event: stream.reset\ndata: 1\n\ndata: 2\n\n")
    assert [m.event for m in messages] == ["stream.reset", "message"]


def test_an_unfinished_message_is_not_dispatched_and_its_id_not_taken() -> None:
    parser = SSEParser("0-1")
    assert parse("id: 1-0\nevent: x\ndata: half", parser) == []
    assert parser.last_event_id == "0-1"  # a resume must ask for that message again


# ---- rendering -----------------------------------------------------------------------------


def op_event(kind: str) -> dict[str, Any]:
    return {"type": f"operation.{kind}", "ts": "2026-01-01T00:00:00.000Z", "operation_id": OP}


def test_render_started_and_progress() -> None:
    started = op_event("started") | {"step": None, "progress": 0, "message": "Setting up"}
    assert render_line("operation.started", started) == f"{OP} started     0% Setting up"
    progress = op_event("progress") | {
        "step": "create_database",
        "progress": 20,
        "message": "Creating your graph's database",
    }
    line = render_line("operation.progress", progress)
    assert line == f"{OP} progress   20% Creating your graph's database"


def test_render_progress_without_message_shows_the_step() -> None:
    data = op_event("progress") | {"step": "verify", "progress": 80}
    assert render_line("operation.progress", data) == f"{OP} progress   80% verify"


def test_render_terminal_events() -> None:
    done = op_event("completed") | {"progress": 100, "message": "Your graph is ready"}
    assert render_line("operation.completed", done) == f"{OP} completed 100% Your graph is ready"
    failed = op_event("failed") | {"progress": 40, "message": "m", "error": "Disk is full."}
    assert render_line("operation.failed", failed) == f"{OP} failed     40% Disk is full."
    cancelled = op_event("cancelled") | {"progress": 60, "message": "Cancelled it."}
    assert render_line("operation.cancelled", cancelled) == f"{OP} cancelled  60% Cancelled it."


def test_render_subscription_updated() -> None:
    sub = {
        "id": SUB,
        "status": "active",
        "plan": "graph-standard",
        "plan_display_name": "Graph Standard",
        "cancel_at_period_end": True,
        "current_period_end": "2026-02-01T00:00:00Z",
        "operation_id": OP,
    }
    data = {"type": "subscription.updated", "subscription_id": SUB, "subscription": sub}
    line = render_line("subscription.updated", data)
    assert line == (
        f"{SUB} active    Graph Standard · cancels on 2026-02-01T00:00:00Z · operation {OP}"
    )
    # A date chosen in the Customer Portal, before the period's end.
    sub.update(cancel_at="2026-01-20T00:00:00.000Z")
    assert "cancels on 2026-01-20T00:00:00.000Z" in render_line("subscription.updated", data)
    sub.update(cancel_at_period_end=False, operation_id=None, plan_display_name=None)
    assert render_line("subscription.updated", data) == f"{SUB} active    graph-standard"


def test_render_invoice_updated() -> None:
    invoice = {
        "id": "in_1",
        "number": "LOOKOUT-0002",
        "status": "open",
        "amount_due": 2900,
        "amount_paid": 0,
        "currency": "usd",
    }
    data = {"type": "invoice.updated", "subscription_id": SUB, "invoice": invoice}
    assert render_line("invoice.updated", data) == f"{SUB} invoice   LOOKOUT-0002 open 29.00 USD"
    invoice.update(status="paid", amount_paid=2900)
    assert render_line("invoice.updated", data).endswith("LOOKOUT-0002 paid 29.00 USD")


def reset(snapshot: dict[str, Any], **subject: str) -> dict[str, Any]:
    return {
        "type": "stream.reset",
        "ts": "2026-01-01T00:00:00.000Z",
        "snapshot": snapshot,
    } | subject


def test_render_stream_reset_names_the_current_state() -> None:
    operation = {"id": OP, "status": "running", "progress": 60}
    data = reset({"operation_id": OP, "operation": operation}, operation_id=OP)
    line = render_line("stream.reset", data)
    assert line == f"{OP} reset     history no longer kept; now running 60%"
    user = reset({"subscriptions": [{"id": SUB}]}, user_id="usr_1")
    assert render_line("stream.reset", user) == (
        "usr_1 reset     history no longer kept; 1 subscription(s) now"
    )
    gone = reset({"operation_id": OP, "operation": None}, operation_id=OP)
    assert render_line("stream.reset", gone) == f"{OP} reset     history no longer kept"


def test_render_an_unknown_event_as_json() -> None:
    assert render_line("thing.new", {"a": [1, 2]}) == 'thing.new {"a":[1,2]}'


def test_exit_codes() -> None:
    assert exit_code_for("operation.progress", {"progress": 50}) is None
    assert exit_code_for("subscription.updated", {}) is None
    assert exit_code_for("operation.completed", {}) == 0
    assert exit_code_for("operation.failed", {}) == 1
    assert exit_code_for("operation.cancelled", {}) == 1

    def op_reset(status: str) -> dict[str, Any]:
        return reset({"operation_id": OP, "operation": {"id": OP, "status": status}})

    assert exit_code_for("stream.reset", op_reset("running")) is None
    assert exit_code_for("stream.reset", op_reset("completed")) == 0
    assert exit_code_for("stream.reset", op_reset("failed")) == 1
    assert exit_code_for("stream.reset", reset({"subscriptions": []})) is None


def test_reconnect_delay_follows_retry_doubles_and_respects_retry_after() -> None:
    assert reconnect_delay(1, 3000) == 3.0
    assert reconnect_delay(2, 3000) == 6.0
    assert reconnect_delay(1, None) == 3.0  # the default when the server sent no retry:
    assert reconnect_delay(20, 3000) == 30.0  # capped
    assert reconnect_delay(1, 500, retry_after=7) == 7.0
    assert reconnect_delay(1, 500, retry_after=7, jitter=0.9) == 7.0  # never sooner
    assert reconnect_delay(2, 1000, jitter=1.1) == pytest.approx(2.2)


# ---- following a stream over HTTP ----------------------------------------------------------


def frame(event_id: str, kind: str, **fields: Any) -> str:
    data = {"type": f"operation.{kind}", "operation_id": OP, **fields}
    return f"id: {event_id}\nevent: operation.{kind}\ndata: {json.dumps(data)}\n\n"


EVENTS = [
    frame("1-0", "started", progress=0, message="Setting up"),
    frame("2-0", "progress", step="create_database", progress=20, message="Creating"),
    frame("3-0", "progress", step="verify", progress=80, message="Checking"),
    frame("4-0", "completed", progress=100, message="Ready"),
]


def scripted(
    handler: Callable[[httpx.Request, int], httpx.Response],
) -> tuple[httpx.Client, list[httpx.Request]]:
    """A client whose server is `handler(request, attempt)`: real HTTP semantics, no socket."""
    seen: list[httpx.Request] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request, len(seen))

    client = httpx.Client(transport=httpx.MockTransport(respond), base_url="http://lookout")
    return client, seen


def sse(*chunks: str) -> httpx.Response:
    def body() -> Iterator[bytes]:
        yield b"retry: 1000\n\n"
        for chunk in chunks:
            yield chunk.encode()

    return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=body())


def positions(request: httpx.Request) -> str | None:
    value: str | None = request.headers.get("Last-Event-ID")
    return value


def test_follow_resumes_after_a_drop_without_gap_or_double() -> None:
    def server(request: httpx.Request, attempt: int) -> httpx.Response:
        if attempt == 1:  # dropped in the middle of the third event
            return sse(EVENTS[0], EVENTS[1], "id: 3-0\nevent: operation.progress\ndata: {")
        if attempt == 2:
            return sse(*EVENTS[2:])
        return httpx.Response(204)

    client, seen = scripted(server)
    sleeps: list[float] = []
    notices: list[str] = []
    got = [
        data["progress"]
        for _, data in follow(
            client, "/v1/operations/x/events", notice=notices.append, sleep=sleeps.append
        )
        if "progress" in data
    ]
    assert got == [0, 20, 80, 100]
    assert [positions(r) for r in seen] == [None, "2-0", "4-0"]
    assert sleeps[0] == pytest.approx(1.0, rel=0.11)  # the stream's retry: 1000
    assert "after event 2-0" in notices[0]


def test_follow_stops_on_204() -> None:
    def server(request: httpx.Request, attempt: int) -> httpx.Response:
        return sse(*EVENTS) if attempt == 1 else httpx.Response(204)

    client, seen = scripted(server)
    events = [kind for kind, _ in follow(client, "/s", notice=lambda _: None, sleep=lambda _: None)]
    assert events == [f"operation.{k}" for k in ("started", "progress", "progress", "completed")]
    assert len(seen) == 2 and positions(seen[1]) == "4-0"


def test_follow_waits_for_retry_after_on_429() -> None:
    def server(request: httpx.Request, attempt: int) -> httpx.Response:
        if attempt == 1:
            body = {"error": {"code": "rate_limited", "message": "Too many streams."}}
            return httpx.Response(429, headers={"Retry-After": "9"}, json=body)
        return httpx.Response(204)

    client, _ = scripted(server)
    sleeps: list[float] = []
    notices: list[str] = []
    assert list(follow(client, "/s", notice=notices.append, sleep=sleeps.append)) == []
    assert sleeps[0] >= 9.0
    assert "Too many streams." in notices[0]


def test_follow_gives_up_on_a_refusal_with_the_server_message() -> None:
    def server(request: httpx.Request, attempt: int) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "No such op."}})

    client, seen = scripted(server)
    with pytest.raises(TailError, match=r"No such op\. \(not_found\)"):
        list(follow(client, "/v1/operations/op_x/events", notice=lambda _: None))
    assert len(seen) == 1


def test_follow_gives_up_when_the_server_never_answers() -> None:
    def server(request: httpx.Request, attempt: int) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    client, seen = scripted(server)
    with pytest.raises(TailError, match="Connection refused"):
        list(follow(client, "/s", notice=lambda _: None, sleep=lambda _: None))
    assert 1 < len(seen) <= 10


def test_missing_api_key_is_a_config_error_that_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LOOKOUT_API_KEY", raising=False)
    with pytest.raises(MissingAPIKey, match="LOOKOUT_API_KEY") as caught:
        run_tail(OP, base_url=None, api_key=None)
    assert isinstance(caught.value, ConfigError)


def test_a_waiting_operation_says_why_and_does_not_end_the_tail() -> None:
    data = {
        "type": "operation.waiting",
        "operation_id": OP,
        "status": "waiting",
        "step": "create_database",
        "progress": 16,
        "retry_at": "2026-12-01T18:00:10.000Z",
        "message": "The database server is not answering; retrying in 10 s",
    }
    line = render_line("operation.waiting", data)
    assert line == f"{OP} waiting    16% The database server is not answering; retrying in 10 s"
    assert exit_code_for("operation.waiting", data) is None
