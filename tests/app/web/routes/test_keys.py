"""API keys can be listed, made and revoked; a revoked key is refused at once on every
instance, its stream tokens stop working and its open streams close (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from app.application import create_app
from app.settings import Settings
from app.users import KeyStatus, create_user, new_api_key, revoke_api_key
from tests.app.test_foundation import run_cli
from tests.streams.sse_client import SSEItem, read_sse
from tests.support.live import free_port, live_server
from tests.support.stack import Stack, running_stack

pytestmark = pytest.mark.anyio

# Streams ask again this often here (10 s in production, well within the contract's 30 s).
RECHECK_SECONDS = 0.5
WITHDRAWN = SSEItem("comment", text="access withdrawn; this stream ends")


def quick(settings: Settings) -> Settings:
    return replace(settings, access_recheck_seconds=RECHECK_SECONDS)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(stack: Stack) -> dict[str, Any]:
    made = await stack.http.post("/v1/api-keys")
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


async def rest_of(response: httpx.Response, *, within: float) -> list[SSEItem]:
    """What the stream says until the server ends it; fails after ``within`` seconds."""
    items = read_sse(response)
    first = await anext(items)
    assert first.kind == "retry"
    with anyio.fail_after(within):
        return [item async for item in items if item.text != "keep-alive"]


async def test_keys_are_listed_made_and_revoked_by_their_user(settings: Settings) -> None:
    async with running_stack(settings) as stack:
        listed = (await stack.http.get("/v1/api-keys")).json()["data"]
        assert len(listed) == 1
        [first] = listed
        assert set(first) == {"id", "created_at", "last_used_at", "revoked_at"}
        assert first["last_used_at"] is not None and first["last_used_at"].endswith("Z")
        assert first["revoked_at"] is None

        made = await new_key(stack)
        assert made["key"].startswith("lk_")
        assert set(made) == {"id", "created_at", "last_used_at", "revoked_at", "key"}
        assert made["last_used_at"] is None
        listed = (await stack.http.get("/v1/api-keys")).json()["data"]
        assert [k["id"] for k in listed] == [first["id"], made["id"]]
        assert all("key" not in k for k in listed)
        assert made["key"] not in (await stack.http.get("/v1/api-keys")).text

        second = bearer(made["key"])
        assert (await stack.anonymous.get("/v1/subscriptions", headers=second)).status_code == 200

        # Another user's key id is not yours to see or revoke.
        _, eve_key = await stack.new_user("eve@example.com")
        eve = bearer(eve_key)
        refused = await stack.anonymous.delete(f"/v1/api-keys/{made['id']}", headers=eve)
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "not_found"
        assert made["id"] not in (await stack.anonymous.get("/v1/api-keys", headers=eve)).text

        revoked = await stack.http.delete(f"/v1/api-keys/{made['id']}")
        assert revoked.status_code == 204
        answer = await stack.anonymous.get("/v1/subscriptions", headers=second)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert (await stack.http.delete(f"/v1/api-keys/{made['id']}")).status_code == 204
        listed = (await stack.http.get("/v1/api-keys")).json()["data"]
        assert listed[1]["revoked_at"] is not None and listed[0]["revoked_at"] is None
        missing = await stack.http.delete("/v1/api-keys/key_nonexistent")
        assert missing.status_code == 404

        # Revoking the key in use, the last one, is allowed: the operator makes a new one.
        assert (await stack.http.delete(f"/v1/api-keys/{first['id']}")).status_code == 204
        assert (await stack.http.get("/v1/api-keys")).status_code == 401


async def test_a_revoked_keys_streams_close_and_its_tokens_stop(settings: Settings) -> None:
    async with running_stack(quick(settings)) as stack:
        made = await new_key(stack)
        doomed = bearer(made["key"])
        issued = await stack.anonymous.post("/v1/stream-tokens", headers=doomed)
        assert issued.status_code == 201
        token = issued.json()["token"]
        kept_token = (await stack.http.post("/v1/stream-tokens")).json()["token"]

        async with (
            stack.anonymous.stream("GET", "/v1/events", headers=doomed) as by_key,
            stack.anonymous.stream("GET", f"/v1/events?token={token}") as by_token,
            stack.http.stream("GET", "/v1/events") as other_key,
        ):
            for response in (by_key, by_token, other_key):
                assert response.status_code == 200
            revoked = await stack.http.delete(f"/v1/api-keys/{made['id']}")
            assert revoked.status_code == 204
            assert await rest_of(by_key, within=30) == [WITHDRAWN]
            assert await rest_of(by_token, within=30) == [WITHDRAWN]
            assert not other_key.is_closed  # the user's other key still listens

        refused = await stack.anonymous.get(f"/v1/events?token={token}")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_token"
        assert "revoked" in refused.json()["error"]["message"]
        again = await stack.anonymous.post("/v1/stream-tokens", headers=doomed)
        assert again.status_code == 401
        # A token of a key still good keeps working.
        async with stack.anonymous.stream("GET", f"/v1/events?token={kept_token}") as kept:
            assert kept.status_code == 200


@contextlib.asynccontextmanager
async def second_instance(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """Another instance of the same deployment: same database, same Redis, another port."""
    port = free_port()
    settings = replace(stack.settings, public_url=f"http://127.0.0.1:{port}")
    async with (
        live_server(create_app(settings), port=port) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client


async def test_revoked_on_one_instance_is_refused_on_the_other(settings: Settings) -> None:
    async with running_stack(quick(settings)) as stack, second_instance(stack) as other:
        made = await new_key(stack)
        doomed = bearer(made["key"])
        assert (await other.get("/v1/subscriptions", headers=doomed)).status_code == 200
        token = (await other.post("/v1/stream-tokens", headers=doomed)).json()["token"]
        async with other.stream("GET", "/v1/events", headers=doomed) as stream:
            assert stream.status_code == 200
            # Revoked through the first instance; the second has never seen that request.
            assert (await stack.http.delete(f"/v1/api-keys/{made['id']}")).status_code == 204
            assert (await other.get("/v1/subscriptions", headers=doomed)).status_code == 401
            assert (await other.get(f"/v1/events?token={token}")).status_code == 401
            assert await rest_of(stream, within=30) == [WITHDRAWN]


async def test_users_keys_on_the_command_line(settings: Settings) -> None:
    assert settings.database_url and settings.redis_url
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}

    async def cli(*args: str) -> tuple[int, str, str]:
        done = await anyio.to_thread.run_sync(lambda: run_cli(*args, env=env))
        return done.returncode, done.stdout, done.stderr

    code, first_key, _ = await cli("users", "create", "k@example.com")
    assert code == 0
    code, out, err = await cli("users", "keys", "create", "k@example.com")
    assert code == 0, err
    assert out.strip().startswith("lk_") and len(out.splitlines()) == 1
    assert out.strip() != first_key.strip()
    code, out, _ = await cli("users", "keys", "list", "k@example.com")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.endswith("active") for line in lines)
    assert "lk_" not in out  # ids and times only
    key_id = lines[1].split()[0]
    code, _, err = await cli("users", "keys", "revoke", key_id, "k@example.com")
    assert code == 0, err
    code, out, _ = await cli("users", "keys", "list", "k@example.com")
    assert "revoked" in out.splitlines()[1] and out.splitlines()[0].endswith("active")

    code, _, err = await cli("users", "keys", "revoke", key_id, "nobody@example.com")
    assert code == 2 and "lookout users create nobody@example.com" in err
    code, _, err = await cli("users", "keys", "revoke", "key_nope", "k@example.com")
    assert code == 2 and "has no key key_nope" in err


class CountingPool:
    """A real pool that counts how many connections were taken."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.taken = 0

    def acquire(self) -> Any:
        self.taken += 1
        return self.pool.acquire()


async def test_checks_due_together_share_one_query(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        user = await create_user(conn, "batch@example.com")
        kept, gone = (await new_api_key(conn, user.id)), (await new_api_key(conn, user.id))
        await revoke_api_key(conn, user.id, gone.record.id)
    counting = CountingPool(db_pool)
    status = KeyStatus(counting)  # type: ignore[arg-type]
    asked = [kept.record.id, gone.record.id, "key_unknown"] * 100
    answers = await asyncio.gather(*(status.active(key_id) for key_id in asked))
    assert answers == [True, False, False] * 100
    assert counting.taken == 1
    assert await status.active(kept.record.id) is True  # nothing kept between queries
    async with db_pool.acquire() as conn:
        await revoke_api_key(conn, user.id, kept.record.id)
    assert await status.active(kept.record.id) is False
    assert counting.taken == 3
