"""Users and their API keys. Only a SHA-256 of a key is stored.

A key is looked up in PostgreSQL on every request, on every instance: revoking it (setting
`revoked_at`) refuses it everywhere at once, with no cache to outlive it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app.db import Connection
from app.ids import new_id
from streams import isoformat_z

__all__ = [
    "ApiKey",
    "KeyHolder",
    "KeyStatus",
    "NewApiKey",
    "User",
    "UserExists",
    "api_key_json",
    "create_api_key",
    "create_user",
    "get_user_by_email",
    "holder_of_api_key",
    "list_api_keys",
    "looks_like_api_key",
    "new_api_key",
    "revoke_api_key",
    "unrevoked_api_keys",
    "user_for_api_key",
]

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "lk_"
# secrets.token_urlsafe(32): 43 characters; a little room for keys made otherwise.
_MAX_API_KEY_LENGTH = 128
# `last_used_at` is written at most this often per key: exact enough to tell an idle key from
# a busy one, without turning every authenticated read into a write.
LAST_USED_RESOLUTION = "60 seconds"


class UserExists(Exception):
    """A user with this email exists already; create a key for them instead."""


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """Who presented a key, and which of their keys it was."""

    user: User
    key_id: str


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A key just made: the only moment its secret is known."""

    record: ApiKey
    key: str


def api_key_json(record: ApiKey) -> dict[str, Any]:
    def time(value: datetime | None) -> str | None:
        return isoformat_z(value) if value is not None else None

    return {
        "id": record.id,
        "created_at": time(record.created_at),
        "last_used_at": time(record.last_used_at),
        "revoked_at": time(record.revoked_at),
    }


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


_KEY_COLUMNS = "id, created_at, last_used_at, revoked_at"


async def create_user(conn: Connection, email: str) -> User:
    user_id = new_id("usr")
    try:
        await conn.execute("INSERT INTO users (id, email) VALUES ($1, $2)", user_id, email)
    except asyncpg.UniqueViolationError:
        raise UserExists(f"a user with email {email} exists already") from None
    return User(id=user_id, email=email)


async def get_user_by_email(conn: Connection, email: str) -> User | None:
    row = await conn.fetchrow("SELECT id, email FROM users WHERE email = $1", email)
    return User(id=row["id"], email=row["email"]) if row else None


async def new_api_key(conn: Connection, user_id: str) -> NewApiKey:
    """A new key of the user's, with its record; the key cannot be read back later."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, user_id, key_hash) VALUES ($1, $2, $3)"
        f" RETURNING {_KEY_COLUMNS}",
        new_id("key"),
        user_id,
        _hash(key),
    )
    assert row is not None
    return NewApiKey(record=_api_key(row), key=key)


async def create_api_key(conn: Connection, user_id: str) -> str:
    """Answers the new key; it cannot be read back later."""
    return (await new_api_key(conn, user_id)).key


async def holder_of_api_key(conn: Connection, key: str) -> KeyHolder | None:
    """The user of an unrevoked key, and the key's id; notes its use (to the minute)."""
    row = await conn.fetchrow(
        "WITH k AS ("
        "  SELECT id, user_id, last_used_at FROM api_keys"
        "  WHERE key_hash = $1 AND revoked_at IS NULL"
        "), used AS ("
        "  UPDATE api_keys a SET last_used_at = now() FROM k WHERE a.id = k.id"
        "  AND (k.last_used_at IS NULL"
        f"   OR k.last_used_at < now() - interval '{LAST_USED_RESOLUTION}')"
        ") SELECT u.id, u.email, k.id AS key_id FROM k JOIN users u ON u.id = k.user_id",
        _hash(key),
    )
    if row is None:
        return None
    return KeyHolder(User(id=row["id"], email=row["email"]), row["key_id"])


def looks_like_api_key(key: str) -> bool:
    """Whether `key` could be one of ours: anything else is refused without a query."""
    return key.startswith(API_KEY_PREFIX) and len(key) <= _MAX_API_KEY_LENGTH


async def user_for_api_key(conn: Connection, key: str) -> User | None:
    holder = await holder_of_api_key(conn, key)
    return holder.user if holder else None


async def list_api_keys(conn: Connection, user_id: str) -> list[ApiKey]:
    """The user's keys, revoked ones included, oldest first."""
    rows = await conn.fetch(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY created_at, id",
        user_id,
    )
    return [_api_key(r) for r in rows]


async def revoke_api_key(conn: Connection, user_id: str, key_id: str) -> ApiKey | None:
    """Revokes one of the user's keys (again: a no-op keeping the first time); None when the
    user has no such key. Revoking the user's last key is allowed: the operator can make a new
    one with `lookout users keys create EMAIL`."""
    row = await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
        f" WHERE id = $1 AND user_id = $2 RETURNING {_KEY_COLUMNS}",
        key_id,
        user_id,
    )
    return _api_key(row) if row else None


async def unrevoked_api_keys(conn: Connection, key_ids: list[str]) -> set[str]:
    """Which of these keys still exist unrevoked."""
    rows = await conn.fetch(
        "SELECT id FROM api_keys WHERE id = ANY($1::text[]) AND revoked_at IS NULL", key_ids
    )
    return {r["id"] for r in rows}


class KeyStatus:
    """Whether API keys are still unrevoked, asked by open streams every few seconds.

    The checks that come due together (the hub's ticker wakes every stream due in the same
    tick) share one query, so 10,000 streams cost one indexed read per tick, not 10,000.
    Nothing is remembered between queries: a revocation is seen by the next check.
    """

    QUERY_TIMEOUT_SECONDS = 5.0

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._waiting: dict[str, list[asyncio.Future[bool]]] = {}
        self._flushing: set[asyncio.Task[None]] = set()

    async def active(self, key_id: str) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        first = not self._waiting
        self._waiting.setdefault(key_id, []).append(future)
        if first:
            task = loop.create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the other checks woken in this tick join first
        waiting, self._waiting = self._waiting, {}
        try:
            async with asyncio.timeout(self.QUERY_TIMEOUT_SECONDS):
                async with self._pool.acquire() as conn:
                    active = await unrevoked_api_keys(conn, list(waiting))
        except Exception as exc:  # every waiter decides what a failed check means
            logger.warning("could not check %d API keys of open streams: %r", len(waiting), exc)
            for futures in waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        for key_id, futures in waiting.items():
            for future in futures:
                if not future.done():
                    future.set_result(key_id in active)
