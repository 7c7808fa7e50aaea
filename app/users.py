"""Users and their API keys. Only a SHA-256 of a key is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import asyncpg

from app.db import Connection
from app.ids import new_id

__all__ = [
    "User",
    "UserExists",
    "create_api_key",
    "create_user",
    "get_user_by_email",
    "looks_like_api_key",
    "user_for_api_key",
]

API_KEY_PREFIX = "lk_"
# secrets.token_urlsafe(32): 43 characters; a little room for keys made otherwise.
_MAX_API_KEY_LENGTH = 128


class UserExists(Exception):
    """A user with this email exists already; create a key for them instead."""


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


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


async def create_api_key(conn: Connection, user_id: str) -> str:
    """Answers the new key; it cannot be read back later."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO api_keys (id, user_id, key_hash) VALUES ($1, $2, $3)",
        new_id("key"),
        user_id,
        _hash(key),
    )
    return key


def looks_like_api_key(key: str) -> bool:
    """Whether `key` could be one of ours: anything else is refused without a query."""
    return key.startswith(API_KEY_PREFIX) and len(key) <= _MAX_API_KEY_LENGTH


async def user_for_api_key(conn: Connection, key: str) -> User | None:
    row = await conn.fetchrow(
        "SELECT u.id, u.email FROM api_keys k JOIN users u ON u.id = k.user_id"
        " WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
        _hash(key),
    )
    return User(id=row["id"], email=row["email"]) if row else None
