"""Short-lived stream tokens for EventSource, which cannot send an Authorization header."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

__all__ = ["ExpiredStreamToken", "InvalidStreamToken", "StreamGrant", "StreamTokens"]

_VERSION: Final = "v1"
# Domain separation: the secret key may sign other things; this MAC is for stream tokens only.
_PURPOSE: Final = b"lookout/stream-token/v1\x00"
_MAX_TTL: Final = 24 * 3600


class InvalidStreamToken(Exception):
    """A token that these keys did not issue (or not whole); the client needs a new one."""


class ExpiredStreamToken(InvalidStreamToken):
    """A stream token past its expiry; the client needs a new one."""


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """What a verified token says: whose streams it opens, and the opaque id of the credential
    it was issued on (None when issued without one), which the caller may check is still good."""

    user_id: str
    credential: str | None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Issues and verifies ``v1.<payload>.<HMAC-SHA256>`` tokens bound to a user id."""

    def __init__(self, secret_key: str | bytes, *, clock: Callable[[], float] = time.time) -> None:
        key = secret_key.encode() if isinstance(secret_key, str) else secret_key
        if len(key) < 16:
            raise ValueError("a stream token secret key must be at least 16 bytes long")
        self._key = key
        self._clock = clock

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, _PURPOSE + payload.encode(), hashlib.sha256).digest())

    def issue(
        self, user_id: str, ttl: float = 300.0, *, credential: str | None = None
    ) -> tuple[str, datetime]:
        """A token for ``user_id`` valid ``ttl`` seconds, and its expiry (aware, UTC).
        ``credential``: an opaque id that ``grant`` answers back (what the token was issued
        on, so that withdrawing that withdraws the token too)."""
        if not 0 < ttl <= _MAX_TTL:
            raise ValueError(f"stream token ttl must be between 0 and {_MAX_TTL} seconds")
        expires = int(self._clock() + ttl)
        claims: dict[str, object] = {"sub": user_id, "exp": expires}
        if credential is not None:
            claims["crd"] = credential
        body = json.dumps(claims, separators=(",", ":"))
        payload = _b64(body.encode())
        return f"{_VERSION}.{payload}.{self._mac(payload)}", datetime.fromtimestamp(expires, UTC)

    def verify(self, token: str) -> str:
        """The user id the token was issued to; raises InvalidStreamToken or ExpiredStreamToken
        (for any string at all: a token comes straight from a query string)."""
        return self.grant(token).user_id

    def grant(self, token: str) -> StreamGrant:
        """The user id and credential the token was issued with; raises as ``verify``."""
        if not token.isascii():  # every token issued here is base64url
            raise InvalidStreamToken("malformed stream token")
        version, _, rest = token.partition(".")
        payload, _, mac = rest.partition(".")
        if version != _VERSION or not payload or not mac:
            raise InvalidStreamToken("malformed stream token")
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            raise InvalidStreamToken("stream token signature does not match")
        try:
            claims = json.loads(_unb64(payload))
            user_id, expires = claims["sub"], claims["exp"]
            credential = claims.get("crd")
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise InvalidStreamToken("unreadable stream token") from exc
        if (
            not isinstance(user_id, str)
            or not isinstance(expires, int)
            or not isinstance(credential, str | None)
        ):
            raise InvalidStreamToken("unreadable stream token")
        if self._clock() >= expires:
            raise ExpiredStreamToken("stream token expired")
        return StreamGrant(user_id, credential)
