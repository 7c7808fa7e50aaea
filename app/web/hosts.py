"""Answering only to the Host names the server was started for (LOOKOUT_ALLOWED_HOSTS).

A page on any site can make a browser send requests to a server on 127.0.0.1 under a name the
attacker controls (DNS rebinding): the browser then treats the answers as that site's own. The
Host header still carries the attacker's name, so refusing unknown names stops it. This runs
ahead of everything, the directly served streams and webhook included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["HostGuard", "host_name"]

# What a refusal may repeat back to help the operator; anything else is not echoed.
_PRINTABLE_HOST: Final = re.compile(r"[a-z0-9.\-\[\]:]{1,255}")


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without its port (IPv6 keeps its brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end != -1 else header
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() else header


class HostGuard:
    """Answers 400 to a request whose Host is not allowed; ``*`` allows any, ``*.example.com``
    a domain's subdomains (not the domain itself)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        names = [h.lower() for h in allowed]
        self._any = "*" in names
        self._exact = frozenset(h for h in names if not h.startswith("*"))
        self._suffixes = tuple(h[1:] for h in names if h.startswith("*."))

    def allows(self, name: str) -> bool:
        return self._any or name in self._exact or (bool(name) and name.endswith(self._suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self._any:
            header = ""
            for key, value in scope["headers"]:
                if key == b"host":
                    header = value.decode("latin-1")
                    break
            name = host_name(header)
            if not self.allows(name):
                await _refuse(name, send)
                return
        await self.app(scope, receive, send)


async def _refuse(name: str, send: Send) -> None:
    shown = name if _PRINTABLE_HOST.fullmatch(name) else "the name clients use"
    message = (
        "This server does not answer to that Host name. If it should, its operator adds "
        f"{shown} to LOOKOUT_ALLOWED_HOSTS (comma-separated host names) and restarts it."
    )
    body = json.dumps({"error": {"code": "host_not_allowed", "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-content-type-options", b"nosniff"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
