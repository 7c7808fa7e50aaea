"""The soak's own parts, on real sockets: the fault proxy refuses, stalls, slows and cuts for
real; the load balancer skips an instance that refuses; the stream check finds gaps, duplicates
and resets that history does not excuse."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import AsyncIterator

import pytest

from bench.chaos.cluster import free_port
from bench.chaos.invariants import Invariant, _compare
from bench.chaos.proxy import FaultProxy, LoadBalancer, fault_proxy, url_through
from bench.chaos.sse import Received, SseClient

pytestmark = pytest.mark.anyio


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A server that answers each line with its name and the line."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()


async def _ask(port: int, line: bytes = b"ping\n", within: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), within)
    finally:
        writer.close()


async def test_the_fault_proxy_forwards_refuses_stalls_slows_and_cuts(echo: int) -> None:
    proxy = FaultProxy("echo", ("127.0.0.1", echo), free_port())
    await proxy.accept()
    try:
        assert await _ask(proxy.port) == b"ping\n"

        await proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            await _ask(proxy.port)
        await proxy.accept()
        assert await _ask(proxy.port) == b"ping\n"

        proxy.stall()
        with pytest.raises(TimeoutError):
            await _ask(proxy.port, within=0.5)
        proxy.unstall()

        proxy.latency = 0.3
        began = time.monotonic()
        assert await _ask(proxy.port) == b"ping\n"
        assert time.monotonic() - began >= 0.5  # once each way
        proxy.latency = 0.0

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"one\n")
        assert await reader.readline() == b"one\n"
        assert proxy.drop_all() == 1
        with pytest.raises(ConnectionResetError):  # cut with a RST, as by a dead host
            await asyncio.wait_for(reader.read(), 2)
        writer.close()
    finally:
        await proxy.close()


async def test_the_fault_proxy_reaches_a_unix_socket_named_as_libpq_names_it() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    with tempfile.TemporaryDirectory() as directory:
        server = await asyncio.start_unix_server(serve, f"{directory}/.s.PGSQL.5999")
        url = f"postgresql://postgres@/postgres?host={directory}&port=5999&sslmode=disable"
        try:
            async with fault_proxy("postgres", url) as proxy:
                through = url_through(url, proxy.port)
                assert (
                    through
                    == f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres?sslmode=disable"
                )
                assert await _ask(proxy.port) == b"ping\n"
                assert proxy.connections == 1
        finally:
            server.close()


async def test_the_load_balancer_skips_an_instance_that_refuses(echo: int) -> None:
    dead = free_port()  # nothing listens there
    balancer = LoadBalancer(free_port(), [dead, echo], random.Random(1))
    await balancer.accept()
    try:
        for _ in range(4):
            assert await _ask(balancer.port) == b"ping\n"
        assert balancer.connections == 4
    finally:
        await balancer.close()


def _client(topic: str, log: list[Received], *, finished: bool = False) -> SseClient:
    client = SseClient("http://unused", "/v1/events", "key", topic, random.Random(0))
    client.log = log
    client.finished = finished
    return client


def test_the_stream_check_accepts_a_stitched_log_that_equals_the_stream() -> None:
    history = [("1-0", "a"), ("2-0", "b"), ("3-0", "c"), ("4-0", "d")]
    log = [Received("2-0", "b", None), Received("3-0", "c", None), Received("4-0", "d", "3-0")]
    inv = Invariant("streams")
    _compare(_client("user:u", log), history, inv)
    assert inv.ok, inv.violations


def test_the_stream_check_finds_a_gap_a_duplicate_and_an_unexcused_reset() -> None:
    history = [("1-0", "a"), ("2-0", "b"), ("3-0", "c"), ("4-0", "d")]
    gap = [Received("1-0", "a", None), Received("3-0", "c", "1-0")]
    dupe = [Received("1-0", "a", None), Received("1-0", "a", "0-1"), Received("2-0", "b", "1-0")]
    reset = [Received("", "stream.reset", None), Received("1-0", "a", None)]
    for log, found in ((gap, "1 missing"), (dupe, "received twice"), (reset, "stream.reset")):
        inv = Invariant("streams")
        _compare(_client("user:u", log), history, inv)
        assert any(found in v for v in inv.violations), (found, inv.violations)


def test_a_reset_is_excused_only_where_history_is_really_gone() -> None:
    history = [("5-0", "e"), ("6-0", "f")]  # trimmed: 1-0 .. 4-0 are gone
    log = [Received("6-0", "stream.reset", "2-0"), Received("7-0", "g", "6-0")]
    inv = Invariant("streams")
    _compare(_client("user:u", log), [*history, ("7-0", "g")], inv)
    assert inv.ok, inv.violations


def test_an_operation_stream_must_hold_the_operation_from_its_first_event() -> None:
    history = [("1-0", "operation.started"), ("2-0", "operation.completed")]
    client = _client("op:x", [Received("2-0", "operation.completed", None)], finished=True)
    client.path = "/v1/operations/x/events"
    inv = Invariant("streams")
    _compare(client, history, inv)
    assert any("1 missing" in v for v in inv.violations), inv.violations


def test_a_dashboard_that_received_nothing_misses_what_came_after_it_opened() -> None:
    history = [("1000-0", "before"), ("9000-0", "after")]
    client = _client("user:u", [])
    client.opened_ms = 2000
    inv = Invariant("streams")
    _compare(client, history, inv)
    assert any("received nothing of 1 events" in v for v in inv.violations), inv.violations


def test_a_dashboard_is_owed_what_came_after_it_opened_not_after_its_first_event() -> None:
    history = [("1000-0", "before"), ("2500-0", "missed"), ("5000-0", "received")]
    log = [Received("5000-0", "received", None)]
    client = _client("user:u", log)
    client.opened_ms = 0  # its subscription was in place by 2000
    inv = Invariant("streams")
    _compare(client, history, inv)
    assert any("1 missing (first 2500-0 missed)" in v for v in inv.violations), inv.violations
    # Opened at 1000: 2500 falls within the two seconds its subscription may take.
    client.opened_ms = 1000
    inv = Invariant("streams")
    _compare(client, history, inv)
    assert inv.ok, inv.violations
